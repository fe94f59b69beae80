"""upsample_add at every shape hg2 runs it at 256x256 (conftest.SHAPES; batch 16 on GPU, 4
on CPU), NCHW and channels_last, float32 and half precision: forward and forward+backward,
eager against every backend and torch.compile of the eager composition.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Each result carries extra_info.speedup_vs_eager, against the eager run of the same group.
Every call takes the next of several input sets (conftest.rotation), so caches do not flatter."""
import itertools

import pytest
import torch

from conftest import BATCH, DEVICE, DTYPES, LAYOUTS, SHAPES, compiled, op_backends, record, rotation, shape_id, sync
from fasthg import ops, reference
from fasthg.bench import dtype_name

# backend innermost so that eager runs first in each group
CASES = list(itertools.product(["forward", "forward+backward"], DTYPES, LAYOUTS, SHAPES["upsample_add"],
                               op_backends("upsample_add")))


@pytest.mark.parametrize("mode,dtype,layout,shape,backend", CASES,
                         ids=[f"{m}-{str(d)[6:]}-{lay}-{shape_id(s)}-{b}" for m, d, lay, s, b in CASES])
def test_upsample_add(benchmark, mode, dtype, layout, shape, backend):
    c, h, w = shape
    key = (mode, dtype, layout, shape)
    benchmark.group = f"upsample_add {mode} {dtype_name(dtype)} {layout} {shape_id(shape)}"
    fmt = LAYOUTS[layout]
    make = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731

    def one_set():  # low, skip and grad; leaves for the backward
        low, skip = make(BATCH, c, h // 2, w // 2), make(BATCH, c, h, w)
        if mode == "forward":
            return low, skip
        return low.requires_grad_(True), skip.requires_grad_(True), make(BATCH, c, h, w)

    sets = rotation(one_set)
    f = compiled(reference.upsample_add, DEVICE) if backend == "compile" else (
        lambda low, skip: ops.upsample_add(low, skip, backend=backend))
    if mode == "forward":
        def fn():
            f(*sets.next())
            sync()
    else:
        def fn():
            low, skip, grad = sets.next()
            torch.autograd.grad(f(low, skip), (low, skip), grad)
            sync()
    fn()  # warm-up (and compilation) outside the timing
    benchmark(fn)
    record(benchmark, key, backend)
