"""The training loop: resumable bit for bit after a signal, stops on a non-finite loss,
writes its log, curves and checkpoints."""
import json
import os
import signal
import sys

import pytest
import torch

import fasthg
import fasthg.train.trainer as train
from fasthg import checkpoint
from fasthg.train import TrainConfig, Trainer

HEATMAP_LOSS = train.heatmap_loss


def tiny(out, **kw):
    return TrainConfig(**{"out": str(out), "stacks": 1, "features": 16, "depth": 2, "input_size": 32,
                          "epochs": 2, "batch_size": 4, "train_size": 16, "val_size": 4, "workers": 0,
                          "progress": False, "backend": "eager", "optimizer": "adam", "lr": 1e-3, **kw})


def weights(path):
    return checkpoint.read(path)["model"]


def log_rows(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


@pytest.mark.parametrize("backend", ["eager", "native"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, capsys, backend, accumulate):
    if backend not in fasthg.ops.available("cpu"):
        pytest.skip(f"{backend} unavailable")
    whole = Trainer(tiny(tmp_path / "whole", backend=backend, accumulate=accumulate))
    whole.fit()

    calls = {"n": 0}
    real = train.heatmap_loss

    def interrupt_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, second batch (4 batches an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(train, "heatmap_loss", interrupt_at_step_6)
    cut = Trainer(tiny(tmp_path / "cut", backend=backend, accumulate=accumulate))
    cut.fit()
    state = checkpoint.read(str(tmp_path / "cut" / "last.pt"))
    assert state["epoch"] == 1 and state["step_in_epoch"] == 2
    assert state["epoch_sums"]["steps"] == 2 and state["epoch_sums"]["images"] == 8
    # epochs are 1-based wherever a person reads them, as in the log and the progress bar
    last = tmp_path / "cut" / "last.pt"
    assert f"stopped by a signal in epoch 2 after step 2 of 4; resume from {last}" in capsys.readouterr().out
    assert cut.summary().startswith("stopped by a signal in epoch 2 after step 2 of 4: 1 of 2 epochs done")
    assert f"resume with: fasthg train --resume {last}" in cut.summary()
    monkeypatch.setattr(train, "heatmap_loss", real)

    resumed = Trainer(tiny(tmp_path / "cut", backend=backend, accumulate=accumulate))
    resumed.resume(str(tmp_path / "cut" / "last.pt"))
    resumed.fit()
    a, b = weights(str(tmp_path / "whole" / "last.pt")), weights(str(tmp_path / "cut" / "last.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["pckh_mean"] for r in whole.history] == [r["pckh_mean"] for r in resumed.history]
    # the resumed epoch's loss averages all its steps, those before the signal too
    assert [r["loss"] for r in log_rows(tmp_path / "whole")] == [r["loss"] for r in log_rows(tmp_path / "cut")]


def test_outputs_log_curves_and_best(tmp_path):
    t = Trainer(tiny(tmp_path, epochs=2))
    history = t.fit()
    assert [r["epoch"] for r in history] == [1, 2]
    rows = log_rows(tmp_path)
    assert rows == history and {"loss", "images_per_s", "lr", "pckh_mean", "pckh_head"} <= rows[0].keys()
    for name in ("last.pt", "best.pt", "curves.png"):
        assert (tmp_path / name).exists(), name
    summary = t.summary().splitlines()
    assert summary[0].startswith("2 of 2 epochs done (2 in this run), ") and summary[0].endswith(" training images/s")
    best = max(history, key=lambda r: r["pckh_mean"])
    assert summary[1] == (f"PCKh@0.5 mean: best {best['pckh_mean']:.1f}% (epoch {best['epoch']}), "
                          f"last {history[-1]['pckh_mean']:.1f}% (epoch 2)")
    assert summary[2:] == ["files written:"] + [f"  {what + ':':18} {tmp_path / name}" for what, name in (
        ("checkpoint", "last.pt"), ("best checkpoint", "best.pt"), ("log", "log.jsonl"), ("curves", "curves.png"))]
    model = checkpoint.load_model(str(tmp_path / "best.pt"))
    assert model.config["num_features"] == 16


def nan_at_steps(monkeypatch, steps):
    """heatmap_loss returns NaN at these (0-based) calls."""
    calls = {"n": -1}
    real = HEATMAP_LOSS

    def loss(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] in steps else 1)

    monkeypatch.setattr(train, "heatmap_loss", loss)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    Trainer(tiny(tmp_path, epochs=1)).fit()
    before = weights(str(tmp_path / "last.pt"))
    nan_at_steps(monkeypatch, {2})
    t = Trainer(tiny(tmp_path, epochs=2))
    t.resume(str(tmp_path / "last.pt"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at epoch 2 step 3 of 4; "):
        t.fit()
    after = weights(str(tmp_path / "last.pt"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_loss_names_its_step_between_and_at_the_checks(tmp_path, monkeypatch):
    """The losses reach the host every check_every steps (here 4 of 10 an epoch: checks at
    steps 3, 7 and the last, 9), yet the error names the first bad step, and no checkpoint
    is written after it."""
    kw = dict(train_size=40, check_every=4, epochs=2)
    Trainer(tiny(tmp_path, **{**kw, "epochs": 1})).fit()
    files = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt")}
    for bad in (0, 3, 5, 9):
        nan_at_steps(monkeypatch, {bad, bad + 1})
        t = Trainer(tiny(tmp_path, **kw))
        t.resume(str(tmp_path / "last.pt"))
        with pytest.raises(FloatingPointError, match=rf"non-finite loss \(nan\) at epoch 2 step {bad + 1} of 10; "):
            t.fit()
        assert {name: (tmp_path / name).read_bytes() for name in files} == files


def test_the_host_waits_for_the_losses_once_in_check_every_steps(tmp_path, monkeypatch):
    """Not at every step: 10 steps, check_every 4 -> 3 checks, and the trainer reads no
    other tensor's value but the epoch's totals. (Adam's own reads of its step count are of
    CPU tensors, no wait for a GPU.)"""
    counts = {"check": 0, "read": 0}
    real_check = Trainer._check

    def check(self, *args):
        counts["check"] += 1
        return real_check(self, *args)

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args):
            counts["read"] += sys._getframe(1).f_code.co_filename == train.__file__
            return real(self, *args)
        return read

    monkeypatch.setattr(Trainer, "_check", check)
    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    Trainer(tiny(tmp_path, train_size=40, check_every=4, epochs=1)).fit()
    assert counts == {"check": 3, "read": 3 + 1}


def test_bad_configs():
    with pytest.raises(ValueError, match="amp must be"):
        Trainer(TrainConfig(amp="fp8"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(TrainConfig(amp="fp16", device="cpu"))
    with pytest.raises(ValueError, match="optimizer must be"):
        Trainer(TrainConfig(optimizer="lbfgs"))
    with pytest.raises(ValueError, match="check_every must be positive"):
        Trainer(TrainConfig(check_every=0))


def test_heatmap_loss_by_hand():
    pred = torch.zeros(1, 2, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    weights = torch.tensor([[1.0, 0.0]])
    # per stack: joint 0 contributes 0.5 * 4 pixels * 1, joint 1 is masked; mean over 2 joints = 1
    assert train.heatmap_loss(pred, target, weights).item() == pytest.approx(2.0)


def test_train_command_and_resume(tmp_path, capsys, monkeypatch):
    from fasthg.bench import malloc
    from fasthg.cli import main

    kept = []  # on the CPU the command keeps freed memory (not in this test process: recorded instead)
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: kept.append(True) or True)
    args = ["train", "--out", str(tmp_path), "--input-size", "32", "--stacks", "1", "--features", "16", "--depth", "2",
            "--train-size", "8", "--val-size", "4", "--batch-size", "4", "--workers", "0", "--no-progress",
            "--device", "cpu", "--backend", "eager"]
    assert main(args + ["--epochs", "1"]) == 0
    # resuming keeps the checkpoint's settings; only what is given again changes
    assert kept == [True]
    resume = ["train", "--resume", str(tmp_path / "last.pt"), "--device", "cpu"]
    first_out = capsys.readouterr().out
    # refused before any training: the message names the setting, both values and why
    for flag, value, message in (("--stacks", "2", "stacks: the checkpoint has 1, given 2; the checkpoint's weights"),
                                 ("--seed", "3", "seed: the checkpoint has 0, given 3; the data order"),
                                 ("--amp", "fp16", "amp: the checkpoint has 'auto', given 'fp16'; fp16 trains with a "
                                                   "grad scaler")):
        assert main(resume + ["--epochs", "2", flag, value]) == 1
        err = capsys.readouterr().err
        assert f"fasthg train: error: cannot resume with these settings changed:\n  {message}" in err, err
        assert "Traceback" not in err
    # the flags given again take effect: the learning rate and its schedule (a drop at the
    # resumed epoch: 0.004 x 0.25 there, as a fresh run with these settings would have)
    assert main(resume + ["--epochs", "2", "--no-keep-freed-memory", "--lr", "0.004", "--lr-drops", "1",
                          "--lr-gamma", "0.25"]) == 0
    assert kept == [True]
    out = first_out + capsys.readouterr().out
    assert "epoch 1:" in out and "epoch 2:" in out
    assert "with epochs 1 -> 2, lr 0.002 -> 0.004, lr_drops (12,) -> (1,), lr_gamma 0.1 -> 0.25" in out
    assert "2 of 2 epochs done (1 in this run)" in out and f"  checkpoint:        {tmp_path / 'last.pt'}" in out
    state = checkpoint.read(str(tmp_path / "last.pt"))
    assert state["epoch"] == 2 and state["config"]["lr"] == 0.004
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.004 * 0.25]
    assert [r["lr"] for r in log_rows(tmp_path)] == [0.002, 0.004 * 0.25]


def test_resume_takes_the_settings_given_and_refuses_those_a_run_cannot_change(tmp_path):
    Trainer(tiny(tmp_path, epochs=1)).fit()
    last = str(tmp_path / "last.pt")
    for change, message in (({"features": 8}, "features: the checkpoint has 16, given 8"),
                            ({"input_size": 64}, "input_size: the checkpoint has 32, given 64"),
                            ({"train_size": 32}, "train_size: the checkpoint has 16, given 32; the run's data order"),
                            ({"optimizer": "sgd"}, "optimizer: the checkpoint has 'adam', given 'sgd'")):
        with pytest.raises(ValueError, match=message):
            Trainer(tiny(tmp_path, **change)).resume(last)
    # mid-epoch (here a checkpoint made to read so, as an older one without partial sums):
    # the batch size and accumulate are refused, the rest resumes
    state = checkpoint.read(last)
    del state["epoch_sums"]
    torch.save({**state, "step_in_epoch": 2}, tmp_path / "mid.pt")
    for change in ({"batch_size": 2}, {"accumulate": 2}):
        name, value = next(iter(change.items()))
        with pytest.raises(ValueError, match=f"{name}: the checkpoint has {getattr(tiny(tmp_path), name)}, given "
                                             f"{value}; the checkpoint stopped at step 2 of an epoch"):
            Trainer(tiny(tmp_path, epochs=2, **change)).resume(str(tmp_path / "mid.pt"))
    t = Trainer(tiny(tmp_path, epochs=2, amp="bf16", workers=1, check_every=3))
    t.resume(str(tmp_path / "mid.pt"))
    assert t._epoch_sums == {"loss_sum": 0.0, "steps": 0, "images": 0, "seconds": 0.0, "data_seconds": 0.0,
                             "step_seconds": 0.0, "skipped": 0}
    # at an epoch's end: a new batch size, accumulate, learning rate and schedule take effect
    t = Trainer(tiny(tmp_path, epochs=2, batch_size=8, accumulate=2, lr=2e-3, lr_drops=(1,), lr_gamma=0.5))
    t.resume(last)
    assert [g["lr"] for g in t.optimizer.param_groups] == [2e-3 * 0.5]
    t.fit()
    assert t.sampler.steps == 2 and [r["lr"] for r in log_rows(tmp_path)] == [1e-3, 2e-3 * 0.5]


def test_cuda_graphs_need_a_cuda_device_and_one_process(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Trainer(tiny(tmp_path, cuda_graphs=True, device="cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["eager", "native", "triton"])
def test_cuda_graph_steps_train_like_eager_steps(tmp_path, backend):
    """Replayed steps follow eager steps (cuDNN may pick other algorithms: close, not equal),
    across an lr drop (the graph is captured again) and with the BN statistics untouched by
    the capture's warm-up. SGD: graphs need Adam(capturable=True), whose different rounding
    Adam turns into steps of about the learning rate in this BN network."""
    if backend not in fasthg.ops.available("cuda"):
        pytest.skip(f"{backend} unavailable")
    runs = {}
    for graphs in (False, True):
        t = Trainer(tiny(tmp_path / str(graphs), backend=backend, device="cuda", cuda_graphs=graphs,
                         optimizer="sgd", lr=0.01, lr_drops=(1,), epochs=2))
        t.fit()
        runs[graphs] = t
    a, b = runs[False].model.state_dict(), runs[True].model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    assert [r["loss"] for r in runs[True].history] == pytest.approx([r["loss"] for r in runs[False].history],
                                                                      rel=1e-3)


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_bf16_autocast_and_channels_last_train_on_the_cpu(tmp_path, backend):
    if backend not in fasthg.ops.available("cpu"):
        pytest.skip(f"{backend} unavailable")
    t = Trainer(tiny(tmp_path, backend=backend, amp="bf16", channels_last=True, epochs=1))
    history = t.fit()
    assert len(history) == 1 and history[0]["loss"] > 0 and history[0]["loss"] < float("inf")
    assert all(p.dtype == torch.float32 for p in checkpoint.read(str(tmp_path / "last.pt"))["model"].values()
               if p.is_floating_point())


def test_optimizer_options_by_device():
    """torch's fused CPU kernels for Adam and SGD, the foreach loop for RMSprop (no fused one);
    on a GPU torch's defaults, capturable for CUDA graphs."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.optimizer_options("adam", cpu) == train.optimizer_options("sgd", cpu) == {"fused": True}
    assert train.optimizer_options("rmsprop", cpu) == {"foreach": True}
    assert train.optimizer_options("adam", cuda) == {} and train.optimizer_options("sgd", cuda, True) == {}
    assert train.optimizer_options("rmsprop", cuda, True) == {"capturable": True}


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop"])
def test_fused_cpu_optimizer_steps_as_torchs_default_loop(tmp_path, optimizer):
    """The fused (or foreach) step against torch's default per-parameter loop from the same
    state: the same update up to float rounding."""
    trainer = Trainer(tiny(tmp_path / "run", optimizer=optimizer))
    fused = trainer.optimizer
    group = fused.param_groups[0]
    assert group.get("fused") is True or group.get("foreach") is True
    params = [p for p in trainer.model.parameters()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    plain = type(fused)(twins, **{k: v for k, v in group.items()
                                  if k not in ("params", "fused", "foreach", "initial_lr")})
    torch.manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_runs_this_machines_optimizer_not_the_checkpoints(tmp_path):
    """A checkpoint from a run with torch's default optimizer loop (an older fasthg, or another
    device) resumes on the CPU with the fused step."""
    first = Trainer(tiny(tmp_path / "a", epochs=1))
    first.fit()
    path = tmp_path / "a" / "last.pt"
    state = checkpoint.read(str(path))
    for group in state["optimizer"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    torch.save(state, str(path))
    again = Trainer(tiny(tmp_path / "a", epochs=2))
    again.resume(str(path))
    assert all(g["fused"] is True for g in again.optimizer.param_groups)
    again.fit()
    assert again.epoch == 2
