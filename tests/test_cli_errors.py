"""Bad input to the `fasthg` command ends in a short message, no traceback: exit status 2 for
usage errors (argparse's own and bad argument values), 1 for failures (files, data), 130 for
Ctrl-C; `fasthg --debug` or FASTHG_DEBUG=1 shows the traceback."""
import os
import subprocess
import sys

import pytest
import torch
from test_checkpoint_cli import tiny
from test_data_loaders import _coco, _cpm_entries, _h5_arrays, _write_h5, _write_images, _write_json

from fasthg import checkpoint
from fasthg.cli import main


def run(capsys, argv, monkeypatch=None, env_debug=None):
    """(exit status, stderr) of `fasthg ARGV`, whether main returns it or argparse exits."""
    if monkeypatch is not None:
        if env_debug is None:
            monkeypatch.delenv("FASTHG_DEBUG", raising=False)
        else:
            monkeypatch.setenv("FASTHG_DEBUG", env_debug)
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def fails(capsys, monkeypatch, argv, status, *words):
    """Run ARGV; assert its exit status, no traceback, and every word in the error line(s)."""
    got, err = run(capsys, argv, monkeypatch)
    assert got == status, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"fasthg {argv[0]}: ")]
    assert lines and len(lines) <= 2, err
    assert lines[0].startswith(f"fasthg {argv[0]}: error: "), err
    for word in words:
        assert word in lines[0], err
    return lines[0]


@pytest.fixture
def ckpt(tmp_path):
    path = str(tmp_path / "m.pt")
    checkpoint.save(path, tiny(), input_size=64)
    return path


@pytest.fixture
def files(tmp_path):
    """Annotation files naming a.png and b.png, a folder holding them and an empty one."""
    _write_images(tmp_path / "images")
    os.makedirs(tmp_path / "empty")
    return {"h5": _write_h5(tmp_path / "valid.h5", _h5_arrays()),
            "json": _write_json(tmp_path / "annot.json", _cpm_entries()),
            "coco": _write_json(tmp_path / "person_keypoints.json", _coco()),
            "images": str(tmp_path / "images"), "empty": str(tmp_path / "empty")}


# --- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["eval", "predict"])
def test_missing_checkpoint(tmp_path, capsys, monkeypatch, cmd):
    _write_images(tmp_path)  # a.png, b.png
    argv = [cmd, str(tmp_path / "missing.pt"), "--device", "cpu"] + ([str(tmp_path / "a.png")] if cmd == "predict"
                                                                     else [])
    fails(capsys, monkeypatch, argv, 1, "missing.pt: no such file", "expected a checkpoint")


def test_text_file_named_pt(tmp_path, capsys, monkeypatch):
    text = tmp_path / "notes.pt"
    text.write_text("a" * 4095 + "\u00e9 my notes\n", encoding="utf-8")  # a character cut where the check reads
    fails(capsys, monkeypatch, ["eval", str(text), "--device", "cpu"], 1,
          "notes.pt: a text file, not a fasthg checkpoint", "expected a checkpoint that fasthg train wrote")


def test_torch_file_that_is_not_a_checkpoint(tmp_path, capsys, monkeypatch):
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    fails(capsys, monkeypatch, ["eval", str(other), "--device", "cpu"], 1,
          "weights.pt: a torch file but not a fasthg checkpoint", "expected a checkpoint")
    torch.save({"format": "fasthg-checkpoint-0"}, other)
    fails(capsys, monkeypatch, ["eval", str(other), "--device", "cpu"], 1,
          "format 'fasthg-checkpoint-0'", "expected 'fasthg-checkpoint-1'")


def test_corrupt_checkpoint_and_folder(tmp_path, capsys, monkeypatch, ckpt):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(ckpt, "rb").read()[:1000])  # truncated
    fails(capsys, monkeypatch, ["eval", str(cut), "--device", "cpu"], 1,
          "cut.pt: not a readable fasthg checkpoint", "expected a checkpoint")
    fails(capsys, monkeypatch, ["eval", str(tmp_path), "--device", "cpu"], 1,
          "a folder, not a checkpoint file")
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(capsys, monkeypatch, ["eval", str(tmp_path / "empty.pt"), "--device", "cpu"], 1,
          "empty.pt: an empty file, not a fasthg checkpoint")


def test_resume_from_a_missing_checkpoint(tmp_path, capsys, monkeypatch):
    fails(capsys, monkeypatch, ["train", "--resume", str(tmp_path / "last.pt"), "--device", "cpu"], 1,
          "last.pt: no such file")


# --- images given to predict ----------------------------------------------------------------

def test_predict_non_image(tmp_path, capsys, monkeypatch, ckpt):
    fake = tmp_path / "photo.jpg"
    fake.write_text("not a picture")
    out = tmp_path / "out"
    fails(capsys, monkeypatch, ["predict", ckpt, str(fake), "--out", str(out), "--device", "cpu"], 1,
          "cannot read image file", "photo.jpg", "not an image OpenCV can decode", "expected a JPEG, PNG")
    fails(capsys, monkeypatch, ["predict", ckpt, str(tmp_path / "gone.png"), "--device", "cpu"], 1,
          "gone.png: no such file")


# --- bad argument values: argparse, exit status 2 ----------------------------------------------

@pytest.mark.parametrize("flag,value,expected", [
    ("--epochs", "-1", "expected a positive integer"),
    ("--epochs", "0", "expected a positive integer"),
    ("--batch-size", "0", "expected a positive integer"),
    ("--stacks", "0", "expected a positive integer"),
    ("--input-size", "-256", "expected a positive integer"),
    ("--features", "x", "expected a positive integer"),
    ("--depth", "0", "expected a positive integer"),
    ("--accumulate", "0", "expected a positive integer"),
    ("--train-size", "0", "expected a positive integer"),
    ("--val-size", "0", "expected a positive integer"),
    ("--check-every", "0", "expected a positive integer"),
    ("--workers", "-1", "expected an integer >= 0"),
    ("--seed", "-3", "expected an integer >= 0"),
    ("--lr", "0", "expected a positive number"),
    ("--lr", "nan", "expected a positive number"),
    ("--sigma", "-1", "expected a positive number"),
    ("--lr-gamma", "0", "expected a positive number"),
    ("--lr-drops", "-1", "expected comma-separated epochs"),
    ("--backend", "cuda-magic", "invalid choice: 'cuda-magic'"),
    ("--optimizer", "lbfgs", "invalid choice: 'lbfgs'"),
    ("--device", "gpu", "unknown device 'gpu': expected cpu, cuda, cuda:N or auto"),
])
def test_train_refuses_bad_values(capsys, monkeypatch, flag, value, expected):
    fails(capsys, monkeypatch, ["train", flag, value], 2, f"argument {flag}", repr(value), expected)


def test_train_accepts_zero_workers_and_seed():
    from fasthg.cli import build_parser

    args = build_parser().parse_args(["train", "--workers", "0", "--seed", "0", "--lr", "1e-3"])
    assert (args.workers, args.seed, args.lr) == (0, 0, 1e-3)


# The flags of `fasthg eval`, each with a bad value, and what the error says.
BAD_EVAL_VALUES = {
    "--backend nope": "argument --backend: invalid choice: 'nope'",
    "--device tpu": "unknown device 'tpu'",
    "--batch-size 0": "argument --batch-size: expected a positive integer, got '0'",
    "--threshold -0.5": "argument --threshold: expected a positive number, got '-0.5'",
    "--input-size 0": "argument --input-size: expected a positive integer",
    "--split test": "argument --split: invalid choice: 'test'",
    "--seed -1": "argument --seed: expected an integer >= 0",
}


@pytest.mark.parametrize("argv,expected", [(k.split(), v) for k, v in BAD_EVAL_VALUES.items()],
                         ids=list(BAD_EVAL_VALUES))
def test_eval_refuses_bad_values(capsys, monkeypatch, ckpt, argv, expected):
    fails(capsys, monkeypatch, ["eval", ckpt] + argv, 2, expected)


def test_no_such_gpu(capsys, monkeypatch, ckpt):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    fails(capsys, monkeypatch, ["eval", ckpt, "--device", f"cuda:{count}"], 2, "no such GPU", "expected cpu")


def test_usage_errors_keep_argparse_form(capsys, monkeypatch):
    status, err = run(capsys, ["train", "--no-such-flag"], monkeypatch)
    assert status == 2 and "unrecognized arguments: --no-such-flag" in err and "Traceback" not in err
    status, err = run(capsys, ["predict"], monkeypatch)
    assert status == 2 and "the following arguments are required" in err


# --- annotation files and image folders ------------------------------------------------------

@pytest.mark.parametrize("kind", ["h5", "json", "coco"])
def test_images_folder_without_the_annotations_images(capsys, monkeypatch, files, kind, tmp_path):
    flag = {"h5": "--mpii-h5", "json": "--mpii-json", "coco": "--coco"}[kind]
    model = str(tmp_path / ("m17.pt" if kind == "coco" else "m16.pt"))
    checkpoint.save(model, tiny(**({"num_joints": 17} if kind == "coco" else {})), input_size=32)
    extra = ["--split", "all"] if kind == "json" else []
    base = ["eval", model, flag, files[kind], "--device", "cpu"] + extra
    line = fails(capsys, monkeypatch, base + ["--images", files["empty"]], 1, files["empty"], "have no image file",
                 os.path.basename(files[kind]), "expected the folder of the images it names")
    assert os.path.join(files["empty"], "a.png") in line
    fails(capsys, monkeypatch, base + ["--images", files["empty"] + "-typo"], 1,
          files["empty"] + "-typo: no such folder")
    fails(capsys, monkeypatch, base, 2, "need --images")


@pytest.mark.parametrize("flag,name,expected", [
    ("--mpii-h5", "valid.h5", "expected MPII annotations in HDF5"),
    ("--mpii-json", "annot.json", "expected MPII annotations as a JSON list"),
    ("--coco", "keypoints.json", "expected COCO person keypoints JSON"),
])
def test_missing_or_wrong_annotation_file(tmp_path, capsys, monkeypatch, ckpt, flag, name, expected):
    argv = ["eval", ckpt, flag, str(tmp_path / name), "--images", str(tmp_path), "--device", "cpu"]
    fails(capsys, monkeypatch, argv, 1, f"{name}: no such file", expected)
    (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 binary")  # some other kind of file
    fails(capsys, monkeypatch, argv, 1, name, expected)


def test_train_on_an_images_folder_without_the_files(tmp_path, capsys, monkeypatch, files):
    argv = ["train", "--mpii-h5-train", files["h5"], "--mpii-h5-valid", files["h5"], "--images", files["empty"],
            "--device", "cpu", "--stacks", "1", "--features", "8", "--depth", "1", "--input-size", "32",
            "--epochs", "1", "--batch-size", "1", "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")]
    fails(capsys, monkeypatch, argv, 1, files["empty"], "have no image file", "valid.h5")


def test_data_errors_of_the_library_keep_their_types(files):
    from fasthg.data.coco import load_coco_keypoints, require_images
    from fasthg.data.mpii import load_mpii_h5

    records = load_mpii_h5(files["h5"], files["empty"])
    with pytest.raises(FileNotFoundError, match="3 of the 3 people of X have no image file"):
        require_images(records, "X", files["empty"])
    require_images(load_coco_keypoints(files["coco"], files["images"]), files["coco"], files["images"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_mpii_h5(files["h5"] + ".missing", files["images"])


# --- --debug, FASTHG_DEBUG, Ctrl-C --------------------------------------------------------------

def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing.pt")
    for argv, env in ((["--debug", "eval", missing], None), (["eval", missing, "--debug"], None),
                      (["eval", missing], "1")):
        status, err = run(capsys, argv + ["--device", "cpu"], monkeypatch, env_debug=env)
        assert status == 1 and "Traceback" in err and "FileNotFoundError" in err
        assert err.rstrip().splitlines()[-1].startswith("fasthg eval: error: ") and "missing.pt: no such file" in err
    status, err = run(capsys, ["eval", missing, "--device", "cpu"], monkeypatch, env_debug="0")
    assert status == 1 and "Traceback" not in err and "--debug" in err


def test_ctrl_c_exits_130(capsys, monkeypatch):
    import fasthg.cli.info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fasthg.cli.info, "run", interrupted)
    status, err = run(capsys, ["info"], monkeypatch)
    assert status == 130 and "fasthg info: interrupted" in err and "Traceback" not in err


def test_bugs_keep_their_traceback(capsys, monkeypatch):
    """An exception that is no user's fault (here a TypeError) is fasthg's bug: it is not hidden."""
    import fasthg.cli.info

    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(fasthg.cli.info, "run", bug)
    with pytest.raises(TypeError):
        main(["info"])


def test_the_installed_command(tmp_path):
    """`python -m fasthg` as a process: the exit status and stderr a shell sees."""
    env = {**os.environ, "FASTHG_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "fasthg", "eval", str(tmp_path / "missing.pt"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == (f"fasthg eval: error: {tmp_path / 'missing.pt'}: no such file (expected "
                                           "a checkpoint that fasthg train wrote, e.g. runs/train/best.pt)")
    assert len(proc.stderr.splitlines()) == 2
    assert proc.stdout == ""
