"""bn_relu at every shape hg2 runs it at 256x256 (conftest.SHAPES; batch 16 on GPU, 4 on
CPU), NCHW and channels_last, float32 and half precision: training forward, training
forward+backward and eval forward, eager relu(batch_norm(x)) against every backend and
torch.compile of it. extra_info.speedup_vs_eager as in test_bench_upsample_add.py; inputs
rotate as there."""
import itertools

import pytest
import torch

from conftest import BATCH, DEVICE, DTYPES, LAYOUTS, SHAPES, compiled, op_backends, record, rotation, shape_id, sync
from fasthg import ops, reference
from fasthg.bench import dtype_name

MODES = ["train forward", "train forward+backward", "eval forward"]
CASES = list(itertools.product(MODES, DTYPES, LAYOUTS, SHAPES["bn_relu"], op_backends("bn_relu_forward")))


@pytest.mark.parametrize("mode,dtype,layout,shape,backend", CASES,
                         ids=[f"{m.replace(' ', '-')}-{str(d)[6:]}-{lay}-{shape_id(s)}-{b}" for m, d, lay, s, b in CASES])
def test_bn_relu(benchmark, mode, dtype, layout, shape, backend):
    c, h, w = shape
    benchmark.group = f"bn_relu {mode} {dtype_name(dtype)} {layout} {shape_id(shape)}"
    backward = mode == "train forward+backward"

    def one_set():  # x (a leaf for the backward) and its grad
        x = torch.randn(BATCH, c, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
        return (x.requires_grad_(True), torch.randn_like(x)) if backward else (x,)

    sets = rotation(one_set)
    wt = torch.rand(c, device=DEVICE, requires_grad=True)
    b = torch.randn(c, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    training = mode.startswith("train")
    if backend == "compile":  # the running-statistics update included, as in the op
        f = compiled(lambda x: reference.bn_relu(x, wt, b, rm, rv, training, 0.1, 1e-5), DEVICE)
    else:
        f = lambda x: ops.bn_relu(x, wt, b, rm, rv, training, backend=backend)  # noqa: E731
    if backward:
        def fn():
            x, grad = sets.next()
            torch.autograd.grad(f(x), (x, wt, b), grad)
            sync()
    else:
        def fn():
            with torch.no_grad():
                f(sets.next()[0])
            sync()
    fn()  # warm-up (and compilation) outside the timing
    benchmark(fn)
    record(benchmark, (mode, dtype, layout, shape), backend)
