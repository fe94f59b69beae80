"""A checkpoint cannot run code: every place fasthg reads one (fasthg.safe_load.load_file under
checkpoint.read/load_model, from_checkpoint, eval, predict, train --init and --resume, the
pytorch-pose mean file) refuses a planted payload in one line, and runs nothing; only
trust=True / --trust-checkpoint unpickles fully. fasthg's own checkpoints hold plain data, and
those of earlier fasthg versions (numpy RNG state) still resume. Damaged checkpoints and
failed writes end in clear errors, the previous checkpoint kept."""
import argparse
import builtins
import errno
import os
import pathlib
import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from test_checkpoint_cli import tiny
from test_cli_errors import fails
from test_from_checkpoint import HourglassNet, PoseNet, princeton_checkpoint, pytorch_pose_checkpoint, randomise

from fasthg import checkpoint
from fasthg.models import from_checkpoint
from fasthg.models.convert import read_checkpoint
from fasthg.safe_load import UnsafeCheckpointError, load_file
from fasthg.train import TrainConfig, Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Exec:
    """Unpickled fully, it runs exec(code): here, code that creates the marker file."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return builtins.exec, (self.code,)


class System:
    """Unpickled fully, it runs a shell command (os.system) that creates the marker file."""

    def __init__(self, marker):
        self.command = f"touch '{marker}'"

    def __reduce__(self):
        return os.system, (self.command,)


PAYLOADS = {"exec": (Exec, "exec"), "os.system": (System, "system")}


def fasthg_contents(payload):
    """A fasthg checkpoint's contents with the payload in its history."""
    return {"format": checkpoint.FORMAT, "model_config": dict(tiny().config), "model": tiny().state_dict(),
            "epoch": 1, "step_in_epoch": 0, "history": [{"epoch": 1, "note": payload}]}


def peer_contents(payload):
    """A pytorch-pose-like checkpoint with the payload in place of one of its tensors."""
    state = nn_state = torch.nn.DataParallel(HourglassNet(1, 1, 16, num_feats=8, depth=2)).state_dict()
    nn_state["module.score.0.bias"] = payload
    return {"epoch": 3, "arch": "hg", "state_dict": state, "best_acc": 0.5}


PLANTS = {"fasthg": fasthg_contents, "peer": peer_contents, "bare": lambda payload: payload}


@pytest.fixture(params=["zip", "legacy"])
def planted(request, tmp_path):
    """make(plant, payload) -> (path of a file holding a payload, the marker it would create)."""
    def make(plant="fasthg", payload="exec", name="payload.pt"):
        marker = tmp_path / f"marker-{name}"
        cls, _ = PAYLOADS[payload]
        path = str(tmp_path / name)
        torch.save(PLANTS[plant](cls(marker)), path, _use_new_zipfile_serialization=request.param == "zip")
        return path, marker
    return make


def refused(err: str, path: str, payload: str):
    assert "\n" not in err.strip(), err
    assert path in err and PAYLOADS[payload][1] in err and "trust" in err, err


# -- the payload, planted in every place a file is read ----------------------------------------

API_READS = {
    "load_file": lambda p: load_file(p),
    "checkpoint.read": lambda p: checkpoint.read(p),
    "checkpoint.load_model": lambda p: checkpoint.load_model(p),
    "from_checkpoint": lambda p: from_checkpoint(p),
    "read_checkpoint": lambda p: read_checkpoint(p),
}


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("read", API_READS)
def test_the_library_refuses_a_payload_and_runs_nothing(planted, read, plant, payload):
    path, marker = planted(plant, payload)
    with pytest.raises(UnsafeCheckpointError) as e:
        API_READS[read](path)
    refused(str(e.value), path, payload)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_payload_in_pytorch_poses_mean_file_is_refused(planted, tmp_path, payload):
    bearpaw = str(tmp_path / "bearpaw.pth.tar")
    pytorch_pose_checkpoint(bearpaw, randomise(HourglassNet(1, 1, 16, num_feats=8, depth=2)))
    mean, marker = planted("bare", payload, "mean.pth.tar")
    with pytest.raises(UnsafeCheckpointError) as e:
        from_checkpoint(bearpaw, input_mean=mean)
    refused(str(e.value), mean, payload)
    assert not marker.exists()


def _image(tmp_path):
    import cv2

    img = str(tmp_path / "person.png")
    cv2.imwrite(img, np.full((40, 30, 3), 90, np.uint8))
    return img


COMMANDS = {
    "eval": lambda p, tmp: ["eval", p, "--n", "2", "--device", "cpu"],
    "predict": lambda p, tmp: ["predict", p, _image(tmp), "--out", str(tmp / "pred"), "--device", "cpu"],
    "train --init": lambda p, tmp: ["train", "--init", p, "--epochs", "1", "--device", "cpu", "--out", str(tmp / "r")],
    "train --resume": lambda p, tmp: ["train", "--resume", p, "--device", "cpu"],
}


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("command", COMMANDS)
def test_the_commands_refuse_a_payload_in_one_line_and_run_nothing(planted, tmp_path, capsys, monkeypatch, command,
                                                                   plant, payload):
    path, marker = planted(plant, payload)
    line = fails(capsys, monkeypatch, COMMANDS[command](path, tmp_path), 1, path, "--trust-checkpoint")
    refused(line, path, payload)
    assert not marker.exists()
    assert not (tmp_path / "r").exists() and not (tmp_path / "pred").exists()  # nothing ran on


@pytest.mark.filterwarnings("ignore:.*pytorch-pose subtracted")
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_the_commands_refuse_a_payload_in_the_mean_file(planted, tmp_path, capsys, monkeypatch, command):
    bearpaw = str(tmp_path / "bearpaw.pth.tar")
    pytorch_pose_checkpoint(bearpaw, randomise(HourglassNet(1, 1, 16, num_feats=8, depth=2)))
    mean, marker = planted("bare", "exec", "mean.pth.tar")
    fails(capsys, monkeypatch, COMMANDS[command](bearpaw, tmp_path) + ["--input-mean", mean], 1, mean, "exec")
    assert not marker.exists()


def test_no_module_reads_a_torch_file_but_the_safe_loader():
    """One reader: a new torch.load elsewhere in the package would bypass it."""
    readers = [str(p.relative_to(ROOT)) for p in (ROOT / "fasthg").rglob("*.py")
               if "torch.load(" in p.read_text() and p.name != "safe_load.py"]
    assert readers == []


# -- the opt-in ----------------------------------------------------------------------------------

def _with_args(path):
    """A real-world shape: a pytorch-pose checkpoint that also pickled its argparse.Namespace."""
    pytorch_pose_checkpoint(path, randomise(HourglassNet(1, 1, 16, num_feats=8, depth=2)))
    contents = torch.load(path, weights_only=True)
    contents["args"] = argparse.Namespace(arch="hg", stacks=1, blocks=1)
    torch.save(contents, path)


@pytest.mark.filterwarnings("ignore:.*pytorch-pose subtracted")
def test_trust_loads_a_file_that_needs_a_class_and_names_it_otherwise(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "with_args.pth.tar")
    _with_args(path)
    with pytest.raises(UnsafeCheckpointError, match=r"a pickled argparse\.Namespace.*trust=True"):
        from_checkpoint(path)
    with pytest.warns(UserWarning, match="loaded with trust"):
        model = from_checkpoint(path, input_mean=[0.5] * 3, trust=True)
    assert model.config["num_stacks"] == 1
    fails(capsys, monkeypatch, ["eval", path, "--n", "2", "--device", "cpu"], 1, "argparse.Namespace",
          "--trust-checkpoint")
    with pytest.warns(UserWarning, match="loaded with trust"):
        assert _main(["eval", path, "--n", "2", "--device", "cpu", "--input-size", "64", "--trust-checkpoint"]) == 0


def test_trust_is_full_unpickling(planted):
    """What the opt-in costs, as its help says: the payload runs."""
    path, marker = planted("fasthg", "exec")
    with pytest.warns(UserWarning, match="loaded with trust"):
        checkpoint.read(path, trust=True)
    assert marker.exists()


def _main(argv):
    from fasthg.cli import main

    return main(argv)


# -- fasthg's own checkpoints: plain data, old ones still resume --------------------------------

def _train_config(out, **kw):
    return TrainConfig(**{"out": str(out), "stacks": 1, "features": 16, "depth": 2, "input_size": 32, "epochs": 1,
                          "batch_size": 4, "train_size": 8, "val_size": 4, "workers": 0, "progress": False,
                          "backend": "eager", "optimizer": "adam", "lr": 1e-3, **kw})


PLAIN = (torch.Tensor, int, float, str, bool, type(None), list, tuple, dict, Counter)


def _not_plain(value, where="checkpoint"):
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _not_plain(v, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _not_plain(v, f"{where}[{i}]")]
    return [] if isinstance(value, PLAIN) and not isinstance(value, np.generic) else [f"{where}: {type(value)}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The folder of a finished one-epoch run (last.pt, best.pt)."""
    out = tmp_path_factory.mktemp("run")
    Trainer(_train_config(out)).fit()
    return out


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_fasthgs_checkpoints_hold_plain_data_only(trained, name):
    path = str(trained / name)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    contents = torch.load(path, weights_only=True)  # torch's own allowlist, no numpy
    assert _not_plain(contents) == []
    assert type(contents["scheduler"]["milestones"]) is Counter  # as the scheduler keeps it


def test_a_checkpoint_of_an_earlier_fasthg_resumes_with_its_random_streams(trained, tmp_path):
    """Before plain data, fasthg saved numpy's state as np.random.get_state()'s tuple (an
    ndarray) and scores as numpy floats: read safely, resumed exactly."""
    np.random.seed(123)
    random.seed(5)
    old = torch.load(str(trained / "last.pt"), weights_only=True)
    old["rng"]["numpy"] = np.random.get_state()
    old["rng"]["python"] = random.getstate()
    old["best"] = np.float64(old["best"])
    old["history"][0]["loss"] = np.float32(old["history"][0]["loss"])
    path = str(tmp_path / "old.pt")
    torch.save(old, path)
    expected_np, expected_py = np.random.random(3), random.random()
    np.random.seed(0)
    random.seed(0)
    t = Trainer(_train_config(tmp_path / "resumed", epochs=2))
    t.resume(path)
    assert np.array_equal(np.random.random(3), expected_np) and random.random() == expected_py
    assert t.epoch == 1 and t.best == float(old["best"])
    t.fit()
    assert _not_plain(torch.load(str(tmp_path / "resumed" / "last.pt"), weights_only=True)) == []


def test_the_random_streams_round_trip_as_plain_data():
    from fasthg.train.trainer import rng_state, set_rng_state

    np.random.seed(9)
    np.random.normal()  # a cached Gaussian in the state
    state = rng_state()
    after = (np.random.normal(), np.random.random(), random.random(), torch.rand(2))
    np.random.seed(0)
    set_rng_state(state)
    again = (np.random.normal(), np.random.random(), random.random(), torch.rand(2))
    assert after[:3] == again[:3] and torch.equal(after[3], again[3])
    assert _not_plain(state) == []


def test_peers_checkpoints_with_numpy_scalars_load_safely(tmp_path):
    path = str(tmp_path / "princeton.pt")
    princeton_checkpoint(path, randomise(PoseNet(1, 16, 16, depth=2)))
    contents = torch.load(path, weights_only=True)
    contents["best_acc"], contents["epoch"] = np.float64(0.71), np.int64(12)
    torch.save(contents, path)
    assert from_checkpoint(path).config["num_stacks"] == 1


# -- damaged checkpoints --------------------------------------------------------------------------

def _saved(tmp_path, edit):
    path = str(tmp_path / "edited.pt")
    contents = {"format": checkpoint.FORMAT, "model_config": dict(tiny().config), "model": tiny().state_dict()}
    edit(contents)
    torch.save(contents, path)
    return path


def _set(key, value):
    def edit(c):
        c["model"][key] = value
    return edit


DAMAGED = {
    "wrong shape": (_set("heads.0.weight", torch.zeros(3, 3, 1, 1)), "shapes that differ (1): heads.0.weight (3, 3, 1, 1)"),
    "wrong dtype": (_set("heads.0.weight", torch.zeros(16, 16, 1, 1, dtype=torch.int64)),
                    "dtypes that differ (1): heads.0.weight torch.int64"),
    "missing key": (lambda c: c["model"].pop("heads.0.bias"), "keys missing (1): heads.0.bias"),
    "no weights": (lambda c: c.pop("model"), "without its model's weights"),
    "a non-tensor weight": (_set("heads.0.bias", [0.0] * 16), "not named tensors: heads.0.bias"),
    "junk config": (lambda c: c["model_config"].update(num_stacks="two"), "make no fasthg StackedHourglass"),
    "config not a dict": (lambda c: c.update(model_config=[1, 2]), "model_config is list"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_fasthg_checkpoint_is_named_before_any_weight_loads(tmp_path, capsys, monkeypatch, damage):
    edit, words = DAMAGED[damage]
    path = _saved(tmp_path, edit)
    for read in (checkpoint.load_model, from_checkpoint):
        with pytest.raises(ValueError) as e:
            read(path)
        assert path in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    model = tiny(num_features=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        checkpoint.load_model(path, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    fails(capsys, monkeypatch, ["eval", path, "--n", "2", "--device", "cpu"], 1, path, words)


def test_nan_weights_load_with_a_warning_naming_them(tmp_path):
    path = _saved(tmp_path, _set("heads.0.bias", torch.full((16,), float("nan"))))
    with pytest.warns(UserWarning, match=r"1 tensors hold NaN or infinite values \(heads\.0\.bias\)"):
        from_checkpoint(path)


@pytest.mark.parametrize("kind", ["zero bytes", "truncated", "zip, not torch", "folder", "random bytes"])
def test_files_that_are_no_checkpoint_are_named(tmp_path, capsys, monkeypatch, kind):
    import zipfile

    path = tmp_path / "broken.pt"
    good = tmp_path / "good.pt"
    checkpoint.save(str(good), tiny())
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "zip, not torch":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(bytes(np.random.default_rng(0).integers(1, 256, 4096, dtype=np.uint8)))
    with pytest.raises((ValueError, OSError)) as e:
        checkpoint.read(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    fails(capsys, monkeypatch, ["eval", str(path), "--device", "cpu"], 1, str(path))


# -- writing: a full disk, a folder one cannot write --------------------------------------------

def _failing_save(error):
    def save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of the file is on disk when the write fails
        raise error
    return save


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                "failed writing file data/3: file write failed")])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pt"
    checkpoint.save(str(path), tiny(), epoch=1)
    monkeypatch.setattr(torch, "save", _failing_save(error))
    with pytest.raises(OSError) as e:
        checkpoint.save(str(path), tiny(), epoch=2)
    monkeypatch.undo()
    assert "the previous checkpoint there is kept" in str(e.value) and str(path) in str(e.value)
    assert ("disk is full" in str(e.value)) == isinstance(error, OSError)
    assert checkpoint.read(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_mid_run_stops_it_with_one_line_and_keeps_its_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--epochs", "1", "--train-size", "8", "--val-size", "4", "--batch-size", "4",
            "--input-size", "32", "--stacks", "1", "--features", "16", "--depth", "2", "--workers", "0",
            "--no-progress", "--device", "cpu", "--backend", "eager"]
    assert _main(argv) == 0
    first = checkpoint.read(str(out / "last.pt"))
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left on device")))
    fails(capsys, monkeypatch, ["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--device", "cpu"], 1,
          "disk is full", "the previous checkpoint there is kept")
    monkeypatch.undo()
    assert checkpoint.read(str(out / "last.pt"))["epoch"] == first["epoch"] == 1
    assert sorted(os.listdir(out)) == sorted(n for n in os.listdir(out) if not n.startswith(".tmp-"))


def test_an_output_folder_that_cannot_be_written_is_named_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(OSError, match="choose a writable output folder"):
        checkpoint.check_writable(str(out))
    started = []
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self: started.append(1))
    fails(capsys, monkeypatch, ["train", "--out", str(out), "--epochs", "1", "--device", "cpu"], 1, str(out),
          "writable")
    assert not started


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_folder_is_named(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError, match="Permission denied"):
            checkpoint.check_writable(str(folder))
    finally:
        folder.chmod(0o700)


def test_warnings_stay_quiet_on_a_good_checkpoint(tmp_path):
    path = str(tmp_path / "good.pt")
    checkpoint.save(path, tiny())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint.load_model(path)
        from_checkpoint(path)
