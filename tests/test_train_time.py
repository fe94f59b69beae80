"""Where a training run's time goes (the log's split, the progress bar), the --minutes budget
(a clean stop, validated and checkpointed, resumable bit for bit) and --amp auto."""
import json
import time
import types

import pytest
import torch

import fasthg.train.trainer as train
from fasthg import checkpoint
from fasthg.cli import main
from fasthg.train import TrainConfig, Trainer
from fasthg.train.config import device_defaults, resolve_amp

from test_train import log_rows, tiny, weights


class Clock:
    """time.time() of the trainer, moved on by `jump` seconds when asked (perf_counter stays real)."""

    def __init__(self, monkeypatch):
        self.offset = 0.0
        monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: time.time() + self.offset,
                                                                 perf_counter=time.perf_counter))

    def jump(self, seconds):
        self.offset += seconds


def test_each_epoch_row_says_where_its_time_went(tmp_path, capsys):
    t = Trainer(tiny(tmp_path, epochs=2))
    t.fit()
    rows = log_rows(tmp_path)
    assert len(rows) == 2
    for r in rows:
        assert {"train_s", "data_s", "step_s", "val_s", "elapsed_s"} <= r.keys()
        assert min(r["data_s"], r["step_s"], r["val_s"]) > 0
        assert r["data_s"] + r["step_s"] <= r["train_s"] * 1.01
    assert rows[0]["elapsed_s"] >= rows[0]["train_s"] + rows[0]["val_s"]
    assert rows[1]["elapsed_s"] >= rows[0]["elapsed_s"] + rows[1]["train_s"]
    out = capsys.readouterr().out
    assert f"; {train.time_split(rows[1])}" in out


def test_time_split_by_hand():
    row = {"train_s": 9.0, "data_s": 1.0, "step_s": 7.5, "val_s": 1.0}
    assert train.time_split(row) == "data 1.0 s (10%), step 7.5 s (75%), validation 1.0 s (10%)"


def test_the_budget_stops_mid_epoch_validated_and_the_run_resumes_bit_for_bit(tmp_path, monkeypatch, capsys):
    whole = Trainer(tiny(tmp_path / "whole"))
    whole.fit()

    clock = Clock(monkeypatch)
    calls = {"n": 0}
    real = train.heatmap_loss

    def late_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2's first batch: the budget is gone by the next one
            clock.jump(120)
        return real(*args)

    monkeypatch.setattr(train, "heatmap_loss", late_at_step_6)
    cut = Trainer(tiny(tmp_path / "cut", minutes=1.0))
    cut.fit()
    state = checkpoint.read(str(tmp_path / "cut" / "last.pt"))
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)  # the step that saw the time up ran to its check
    out = capsys.readouterr().out
    assert "stopped by the time budget (--minutes 1) in epoch 2 after step 2 of 4; resume from" in out
    rows = log_rows(tmp_path / "cut")
    assert [r["epoch"] for r in rows] == [1, 1.5]  # half of epoch 2, validated
    assert rows[1]["elapsed_s"] >= 120
    assert (tmp_path / "cut" / "best.pt").exists()
    monkeypatch.setattr(train, "heatmap_loss", real)

    resumed = Trainer(tiny(tmp_path / "cut"))  # no budget: to the end
    resumed.resume(str(tmp_path / "cut" / "last.pt"))
    resumed.fit()
    a, b = weights(str(tmp_path / "whole" / "last.pt")), weights(str(tmp_path / "cut" / "last.pt"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    whole_rows, cut_rows = log_rows(tmp_path / "whole"), log_rows(tmp_path / "cut")
    assert [r["epoch"] for r in cut_rows] == [1, 1.5, 2]
    for key in ("loss", "pckh_mean"):
        assert [r[key] for r in whole_rows] == [r[key] for r in cut_rows if r["epoch"] in (1, 2)], key
    assert cut_rows[2]["elapsed_s"] > cut_rows[1]["elapsed_s"]  # the run's time goes on across the resume


def test_the_budget_spent_in_validation_stops_before_the_next_epoch(tmp_path, monkeypatch, capsys):
    whole = Trainer(tiny(tmp_path / "whole", epochs=3))
    whole.fit()

    clock = Clock(monkeypatch)
    real = train.evaluate

    def slow_validation(*args, **kw):
        clock.jump(61)
        return real(*args, **kw)

    monkeypatch.setattr(train, "evaluate", slow_validation)
    cut = Trainer(tiny(tmp_path / "cut", epochs=3, minutes=1.0))
    cut.fit()
    assert "stopped by the time budget (--minutes 1) after epoch 1; resume from" in capsys.readouterr().out
    state = checkpoint.read(str(tmp_path / "cut" / "last.pt"))
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    monkeypatch.setattr(train, "evaluate", real)
    resumed = Trainer(tiny(tmp_path / "cut", epochs=3))
    resumed.resume(str(tmp_path / "cut" / "last.pt"))
    resumed.fit()
    a, b = weights(str(tmp_path / "whole" / "last.pt")), weights(str(tmp_path / "cut" / "last.pt"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in log_rows(tmp_path / "cut")] == [1, 2, 3]


def test_minutes_on_the_command_line_and_not_carried_by_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--stacks", "1", "--features", "16", "--depth", "2", "--input-size", "32",
            "--epochs", "1", "--batch-size", "4", "--train-size", "8", "--val-size", "4", "--workers", "0",
            "--backend", "eager", "--no-progress"]
    assert main(args + ["--minutes", "30"]) == 0
    state = checkpoint.read(str(out / "last.pt"))
    assert state["config"]["minutes"] == 30.0
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert checkpoint.read(str(out / "last.pt"))["config"]["minutes"] is None
    with pytest.raises(SystemExit):
        main(args + ["--minutes", "0"])
    assert "--minutes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="minutes must be positive"):
        Trainer(tiny(tmp_path / "bad", minutes=-1.0))


def test_amp_auto_is_bf16_where_the_cpu_computes_bf16(monkeypatch, tmp_path):
    """The CPU default changes the numerics where the CPU has bf16 instructions (AMX,
    AVX512_BF16): the steps run under bf16 autocast there, float32 elsewhere."""
    import fasthg.device

    assert device_defaults("cpu")["amp"] == "auto" and device_defaults("cuda")["amp"] == "none"
    assert TrainConfig.for_device("cpu").amp == "auto"
    for has, want in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(fasthg.device, "cpu_computes_bf16", lambda has=has: has)
        assert resolve_amp("auto", torch.device("cpu")) == want
        assert Trainer(tiny(tmp_path / str(has), amp="auto")).amp == want
    assert resolve_amp("auto", torch.device("cuda")) == "none"
    for mode in ("none", "bf16", "fp16"):
        assert resolve_amp(mode, torch.device("cpu")) == mode

    seen = []
    real = train.heatmap_loss

    def spy(pred, *args):
        seen.append(pred.dtype)
        return real(pred, *args)

    monkeypatch.setattr(train, "heatmap_loss", spy)
    monkeypatch.setattr(fasthg.device, "cpu_computes_bf16", lambda: True)
    Trainer(tiny(tmp_path / "auto", amp="auto", epochs=1, train_size=4)).fit()
    assert seen and set(seen) == {torch.bfloat16}
