"""Checkpoints (atomic, clear errors) and the eval / predict commands."""
import os

import cv2
import numpy as np
import pytest
import torch

from fasthg import checkpoint
from fasthg.cli import main
from fasthg.models import StackedHourglass


def tiny(**kw):
    torch.manual_seed(0)
    return StackedHourglass(**{"num_stacks": 1, "num_features": 16, "depth": 2, "backend": "eager", **kw})


def test_checkpoint_round_trip_and_no_temporary_files_left(tmp_path):
    model = tiny()
    path = tmp_path / "sub" / "ckpt.pt"
    checkpoint.save(str(path), model, epoch=3, input_size=64)
    assert os.listdir(path.parent) == ["ckpt.pt"]
    loaded = checkpoint.load_model(str(path))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert checkpoint.read(str(path))["epoch"] == 3


def test_checkpoint_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt: not a readable fasthg checkpoint"):
        checkpoint.read(str(corrupt))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="not a fasthg checkpoint"):
        checkpoint.read(str(other))
    good = tmp_path / "good.pt"
    checkpoint.save(str(good), tiny())
    with pytest.raises(ValueError, match="checkpoint of a model"):
        checkpoint.load_model(str(good), model=tiny(num_features=32))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(str(path), tiny(), epoch=1)

    def broken(*a, **k):
        raise KeyboardInterrupt  # an interrupt in the middle of writing

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(str(path), tiny(), epoch=2)
    monkeypatch.undo()
    assert checkpoint.read(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_eval_and_predict_commands(tmp_path, capsys):
    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, tiny(), input_size=64)
    grid = str(tmp_path / "grid.png")
    assert main(["eval", ckpt, "--n", "6", "--grid", grid, "--flip-test", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PCKh@0.5 on 6 people" in out and "Mean" in out
    assert cv2.imread(grid).shape == (2 * 64, 4 * 64, 3)  # 6 tiles: 2 rows of 4
    img = str(tmp_path / "person.jpg")
    cv2.imwrite(img, np.full((90, 70, 3), 128, np.uint8))
    assert main(["predict", ckpt, img, "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert cv2.imread(str(tmp_path / "pred" / "person_pose.png")).shape == (90, 70, 3)


def test_predict_says_where_it_wrote_each_picture(tmp_path, capsys, monkeypatch):
    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, tiny(), input_size=64)
    for name in ("photo.jpg", "other.png"):
        cv2.imwrite(str(tmp_path / name), np.full((40, 30, 3), 90, np.uint8))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", ckpt, "photo.jpg", "other.png", "--device", "cpu"]) == 0
    out = os.path.join("runs", "predict")  # the default folder, under the current one
    assert capsys.readouterr().out.splitlines() == [f"photo.jpg -> {os.path.join(out, 'photo_pose.png')}",
                                                    f"other.png -> {os.path.join(out, 'other_pose.png')}"]
    assert sorted(os.listdir(tmp_path / out)) == ["other_pose.png", "photo_pose.png"]
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "default: runs/predict" in " ".join(capsys.readouterr().out.split())


def test_predict_unreadable_image(tmp_path, capsys):
    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, tiny(), input_size=64)
    assert main(["predict", ckpt, str(tmp_path / "missing.jpg"), "--out", str(tmp_path)]) == 1
    assert "missing.jpg: no such file" in capsys.readouterr().err


def test_every_flag_of_every_command_has_help():
    import argparse

    from fasthg.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)
    missing = [f"{name} {a.option_strings or a.dest}" for name, parser in sub.choices.items()
               for a in parser._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"flags without help text: {missing}"


def test_shared_argument_types():
    import argparse

    from fasthg.cli import args
    from fasthg.models import PRESETS
    from fasthg.ops import BACKENDS

    assert args.positive_ints("64,32,") == [64, 32] and args.epochs("") == () and args.epochs("3,5") == (3, 5)
    assert args.positive_int("7") == 7 and args.models("none") == [] and args.models("hg1,hg8") == ["hg1", "hg8"]
    assert args.dtypes("bf16,f32") == [torch.bfloat16, torch.float32] and args.layouts("nhwc") == ["nhwc"]
    for parse, text in ((args.positive_ints, "0,4"), (args.positive_ints, ""), (args.epochs, "-1"),
                        (args.positive_int, "0"), (args.positive_int, "2,3"), (args.models, "hg3"),
                        (args.models, ""), (args.dtypes, "int8"), (args.layouts, "nchw,chwn")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    p = argparse.ArgumentParser()
    args.add_backend(p)
    assert next(a for a in p._actions if a.dest == "backend").choices == BACKENDS and "hg4" in PRESETS


def _read_predictions(path):
    """pos_pred_src (2, J, N) back from a file fasthg eval --save-predictions wrote."""
    import json

    import h5py

    ext = os.path.splitext(path)[1]
    if ext == ".mat":  # MATLAB 7.3: HDF5, MATLAB's dimensions reversed
        with h5py.File(path, "r") as f:
            assert f["pos_pred_src"].attrs["MATLAB_class"] == b"double"
            return f["pos_pred_src"][()].T
    if ext == ".h5":
        with h5py.File(path, "r") as f:
            return f["pos_pred_src"][()]
    if ext == ".npz":
        return np.load(path)["pos_pred_src"]
    if ext == ".json":
        return np.array(json.load(open(path))["pos_pred_src"])
    rows = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)
    n, j = rows["person"].max() + 1, rows["joint"].max() + 1
    return np.stack([rows["x_1based"], rows["y_1based"]]).reshape(2, n, j).transpose(0, 2, 1)


@pytest.mark.parametrize("ext", [".mat", ".h5", ".npz", ".json", ".csv"])
def test_saved_predictions_round_trip_one_based(tmp_path, ext, monkeypatch):
    from fasthg.cli.eval import save_predictions

    if ext == ".mat":  # without scipy: MATLAB 7.3 (HDF5); the scipy branch is tested below where installed
        monkeypatch.setitem(__import__("sys").modules, "scipy.io", None)
    pred = np.random.default_rng(0).uniform(0, 300, (3, 16, 2))
    path = str(tmp_path / f"pred{ext}")
    save_predictions(path, pred, np.array([4, 7, 9]))
    pos = _read_predictions(path)
    assert pos.shape == (2, 16, 3) and np.array_equal(pos, pred.transpose(2, 1, 0) + 1)
    if ext == ".mat":
        assert open(path, "rb").read(19) == b"MATLAB 7.3 MAT-file"
    with pytest.raises(ValueError, match="predictions are written as"):
        save_predictions(str(tmp_path / "pred.txt"), pred, np.arange(3))


def test_saved_predictions_mat_with_scipy(tmp_path):
    io = pytest.importorskip("scipy.io")
    from fasthg.cli.eval import save_predictions

    pred = np.random.default_rng(1).uniform(0, 300, (2, 16, 2))
    save_predictions(str(tmp_path / "pred.mat"), pred, np.arange(2))
    assert np.array_equal(io.loadmat(str(tmp_path / "pred.mat"))["pos_pred_src"], pred.transpose(2, 1, 0) + 1)


def test_eval_limit_per_joint_table_and_saved_predictions(tmp_path, capsys):
    from fasthg.data.dataset import PoseDataset
    from fasthg.data.records import MPII_JOINTS
    from fasthg.data.synthetic import SyntheticPoses
    from fasthg.evaluate import predict_dataset

    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, tiny(), input_size=64)
    saved = str(tmp_path / "out" / "pred.npz")
    assert main(["eval", ckpt, "--n", "6", "--limit", "3", "--save-predictions", saved, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "PCKh@0.5 on 3 people" in out and "per joint:" in out
    lines = out.split("per joint:\n")[1].splitlines()
    assert [line.split()[0] for line in lines[1:17]] == list(MPII_JOINTS)
    assert "1-based" in out and os.path.exists(saved)
    # the same three people's predictions, computed here: the file holds them + 1
    res = predict_dataset(checkpoint.load_model(ckpt), PoseDataset(SyntheticPoses(3, 64, seed=12345), 64, train=False),
                          progress=False)
    assert np.allclose(_read_predictions(saved), res["pred"].transpose(2, 1, 0) + 1)
    assert "coordinates" in np.load(saved) and list(np.load(saved)["index"]) == [0, 1, 2]
    with pytest.raises(SystemExit):
        main(["eval", ckpt, "--save-predictions", str(tmp_path / "pred.txt")])
    with pytest.raises(SystemExit):
        main(["eval", ckpt, "--limit", "0"])
