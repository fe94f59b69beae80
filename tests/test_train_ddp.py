"""Data-parallel training on 2 CPU processes (gloo): with synchronised BN-ReLU statistics
they follow one process trained on the same global batch; under torchrun only rank 0
evaluates, logs and writes checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fasthg
from fasthg import checkpoint
from fasthg.train import Trainer
from test_train import tiny as tiny_adam

WORLD = 2


def tiny(out, **kw):
    """test_train's tiny run with SGD: Adam's sign-like first steps would turn rounding
    differences between the runs into whole learning-rate steps."""
    return tiny_adam(out, **{"optimizer": "sgd", "lr": 0.01, **kw})


def _worker(rank, init_file, out, backend):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        t = Trainer(tiny(out, backend=backend, sync_bn=True))
        assert isinstance(t.step_model, torch.nn.parallel.DistributedDataParallel)
        t.fit()
        assert bool(t.history) == (rank == 0), "only rank 0 evaluates and logs"
        t.close()  # frees DDP's hold on the group before the group goes
        assert t.step_model is t.model and dist.is_initialized(), "close() leaves a group it did not make"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "native"])
def test_two_processes_with_sync_bn_follow_one_process_on_the_global_batch(tmp_path, backend):
    if backend not in fasthg.ops.available("cpu"):
        pytest.skip(f"{backend} unavailable")
    one = Trainer(tiny(tmp_path / "one", backend=backend, batch_size=4 * WORLD))
    one.fit()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "two"), backend), nprocs=WORLD)
    a = checkpoint.read(str(tmp_path / "one" / "last.pt"))
    b = checkpoint.read(str(tmp_path / "two" / "last.pt"))
    assert a["model"].keys() == b["model"].keys()
    init = Trainer(tiny(tmp_path / "init_only", backend=backend)).model.state_dict()
    keys = [k for k, v in a["model"].items() if v.is_floating_point()]
    flat = lambda sd: torch.cat([sd[k].flatten() for k in keys])  # noqa: E731
    moved = (flat(a["model"]) - flat(init)).norm()
    apart = (flat(a["model"]) - flat(b["model"])).norm()
    # Four steps of a small-batch BN net amplify rounding: measured, the two-process run ends
    # 0.3% (of the distance trained) from the one-process run; one process in channels_last
    # ends 2.7% from itself in NCHW; without sync_bn the two processes end 68% away.
    assert moved > 0.1
    assert apart < 0.05 * moved, f"{apart / moved:.2%} apart"
    assert [r["epoch"] for r in b["history"]] == [1, 2]


def _one_process_interrupted(rank, init_file, out, what):
    """Rank 1 alone gets a SIGINT, or a NaN loss, at its step 2 of 6 an epoch; the losses
    reach the host every 2 steps (checks at steps 1, 3, 5)."""
    import signal
    from datetime import timedelta

    import fasthg.train.trainer as train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    # a process left waiting for the other fails the test in a minute rather than hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        calls, real = {"n": -1}, train.heatmap_loss

        def loss(*args):
            calls["n"] += 1
            if rank == 1 and calls["n"] == 2 and what == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            return real(*args) * (float("nan") if rank == 1 and calls["n"] == 2 and what == "nan" else 1)

        train.heatmap_loss = loss
        t = Trainer(tiny(out, train_size=48, check_every=2, epochs=1))
        if what == "nan":
            want = "in another process" if rank == 0 else "nan"
            with pytest.raises(FloatingPointError, match=rf"non-finite loss \({want}\) at epoch 1 step 3 of 6; "):
                t.fit()
        else:
            t.fit()
            assert not t.history and t.epoch == 0
        t.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_process_stops_at_the_same_check(tmp_path):
    """A signal to one process stops both at the next check (step 3, an optimizer step): the
    checkpoint resumes at step 4. A NaN in one process stops both, naming its step."""
    mp.spawn(_one_process_interrupted, args=(str(tmp_path / "init1"), str(tmp_path / "signal"), "signal"),
             nprocs=WORLD)
    assert checkpoint.read(str(tmp_path / "signal" / "last.pt"))["step_in_epoch"] == 4
    mp.spawn(_one_process_interrupted, args=(str(tmp_path / "init2"), str(tmp_path / "nan"), "nan"), nprocs=WORLD)
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_sampler_slices_each_global_batch_by_rank():
    from fasthg.data.sampler import EpochSampler

    whole = EpochSampler(21, seed=3, batch_size=6)
    parts = [EpochSampler(21, seed=3, batch_size=3, rank=r, world=2) for r in range(2)]
    order = list(whole)
    assert len(order) == 18 and sorted(set(order)) == sorted(order)
    got = [list(p) for p in parts]
    for step in range(3):  # global batch k of one process = rank 0's k-th batch + rank 1's
        assert order[6 * step:6 * step + 6] == got[0][3 * step:3 * step + 3] + got[1][3 * step:3 * step + 3]
    parts[1].start = 3  # resumed after one step
    assert list(parts[1]) == got[1][3:] and len(parts[1]) == 6


@pytest.mark.slow
def test_torchrun_cli_writes_from_rank_zero_only(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "fasthg", "train", "--device", "cpu", "--out", str(out), "--input-size", "32", "--stacks", "1",
           "--features", "16", "--depth", "2", "--epochs", "1", "--batch-size", "4", "--train-size", "16",
           "--val-size", "4", "--workers", "0", "--backend", "eager", "--sync-bn", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("x 2 process(es)") == 1 and r.stdout.count("epoch 1:") == 1, r.stdout
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [row["epoch"] for row in rows] == [1]
    assert checkpoint.read(str(out / "last.pt"))["config"]["sync_bn"] is True
