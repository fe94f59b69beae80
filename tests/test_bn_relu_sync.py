"""Cross-process BN-ReLU (and BN-add-ReLU) statistics: 2 CPU processes on gloo, each with part
of a batch, must compute what one process computes on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import rel_err
import fasthg
from fasthg.nn import BNAddReLU, BNReLU, convert_sync_bn_relu

C = 6
SHARDS = (3, 2)  # uneven on purpose: the merge must weigh by counts
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SHARDS), C, 5, 4, generator=g) * 2 + 1
    weights = torch.randn(x.shape, generator=g)  # loss = sum(y * weights)
    return x, weights


def _residual(x):  # what BNAddReLU adds: a function of x, so that shards slice it alike
    return torch.sin(3 * x)


def _module(backend, kind="bn_relu"):
    torch.manual_seed(0)
    m = (BNReLU if kind == "bn_relu" else BNAddReLU)(C, backend=backend)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
    return m


def _run(m, x, weights, layout, steps=2):
    """Training steps; returns the last output and gradients, and the running statistics."""
    for _ in range(steps):
        xs = x.clone().contiguous(memory_format=layout).requires_grad_(True)
        m.zero_grad()
        y = m(xs) if isinstance(m, BNReLU) else m(xs, _residual(xs))
        (y * weights).sum().backward()
    return {"y": y.detach(), "gx": xs.grad, "gw": m.weight.grad, "gb": m.bias.grad,
            "rm": m.running_mean.clone(), "rv": m.running_var.clone()}


def _worker(rank, init_file, backend, layout, out_dir, kind):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(SHARDS))
    try:
        x, weights = _data()
        lo = sum(SHARDS[:rank])
        part = slice(lo, lo + SHARDS[rank])
        m = convert_sync_bn_relu(_module(backend, kind))
        torch.save(_run(m, x[part], weights[part], LAYOUTS[layout]), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Done and written: leave without the interpreter's teardown, in which gloo's threads once
    # aborted a worker (SIGABRT, "terminate called without an active exception") on a loaded VM.
    os._exit(0)


@pytest.mark.parametrize("kind", ["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("backend,layout", [("eager", "nchw"), ("native", "nchw"), ("native", "nhwc"),
                                            ("triton", "nchw")])
def test_two_processes_equal_one_process_on_the_whole_batch(backend, layout, kind, tmp_path):
    if backend not in fasthg.ops.available("cpu", kind):
        pytest.skip(f"{backend} has no CPU {kind} here")
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend, layout, str(tmp_path), kind), nprocs=len(SHARDS),
             join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(len(SHARDS))]
    x, weights = _data()
    whole = _run(_module("eager", kind).double(), x.double(), weights.double(), torch.contiguous_format)
    for key in ("y", "gx"):
        assert rel_err(torch.cat([p[key] for p in parts]), whole[key]) < 1e-5, key
    for key in ("gw", "gb"):  # local, as nn.SyncBatchNorm: DDP adds (averages) them
        assert rel_err(sum(p[key] for p in parts), whole[key]) < 1e-5, key
    for p in parts:
        for key in ("rm", "rv"):
            assert rel_err(p[key], whole[key]) < 1e-6, key


def test_sync_needs_an_initialised_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        fasthg.ops.bn_relu(torch.randn(2, 3, 4, 4), sync=True)


def test_sync_is_not_needed_in_eval_mode():
    # Eval uses the running statistics: no process group needed, same result as without sync.
    x = torch.randn(2, 3, 4, 4)
    plain = BNReLU(3).eval()
    with torch.no_grad():
        plain.running_mean.uniform_(-1, 1)
    synced = convert_sync_bn_relu(BNReLU(3)).eval()
    synced.load_state_dict(plain.state_dict())
    torch.testing.assert_close(synced(x), plain(x))
