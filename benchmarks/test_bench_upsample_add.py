"""upsample_add at the hourglass's shapes (batch 16 on GPU, 4 on CPU; 256 channels;
64x64..8x8 outputs; NCHW and channels_last): eager against every backend.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Each result carries extra_info.speedup_vs_eager, against the eager run of the same group.
Every call takes the next of several input sets (conftest.rotation), so caches do not flatter."""
import itertools

import pytest
import torch

from conftest import DEVICE, backends_for, record, rotation, sync
from fasthg import ops

BATCH = 16 if DEVICE == "cuda" else 4
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# backend innermost so that eager runs first in each group
CASES = list(itertools.product(["forward", "forward+backward"], DTYPES, LAYOUTS, [64, 32, 16, 8],
                               backends_for("upsample_add")))


@pytest.mark.parametrize("mode,dtype,layout,level,backend", CASES,
                         ids=[f"{m}-{str(d)[6:]}-{lay}-{lv}-{b}" for m, d, lay, lv, b in CASES])
def test_upsample_add(benchmark, mode, dtype, layout, level, backend):
    key = (mode, dtype, layout, level)
    benchmark.group = f"upsample_add {mode} {str(dtype)[6:]} {layout} {level}x{level}"
    fmt = LAYOUTS[layout]
    make = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731

    def one_set():  # low, skip and grad; leaves for the backward
        low, skip = make(BATCH, 256, level // 2, level // 2), make(BATCH, 256, level, level)
        if mode == "forward":
            return low, skip
        return low.requires_grad_(True), skip.requires_grad_(True), make(BATCH, 256, level, level)

    sets = rotation(one_set)
    if mode == "forward":
        def fn():
            ops.upsample_add(*sets.next(), backend=backend)
            sync()
    else:
        def fn():
            low, skip, grad = sets.next()
            torch.autograd.grad(ops.upsample_add(low, skip, backend=backend), (low, skip), grad)
            sync()
    benchmark(fn)
    record(benchmark, key, backend)
