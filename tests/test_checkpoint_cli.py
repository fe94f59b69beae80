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


def test_predict_unreadable_image(tmp_path):
    ckpt = str(tmp_path / "m.pt")
    checkpoint.save(ckpt, tiny(), input_size=64)
    with pytest.raises(ValueError, match="cannot read image"):
        main(["predict", ckpt, str(tmp_path / "missing.jpg"), "--out", str(tmp_path)])
