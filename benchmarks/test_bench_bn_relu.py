"""bn_relu at the hourglass's shapes (batch 16 on GPU, 4 on CPU; 256 channels; 64x64..8x8;
NCHW and channels_last): training forward, training forward+backward and eval forward,
eager relu(batch_norm(x)) against every backend. extra_info.speedup_vs_eager as in
test_bench_upsample_add.py; inputs rotate as there."""
import itertools

import pytest
import torch

from conftest import DEVICE, backends_for, record, rotation, sync
from fasthg import ops

BATCH = 16 if DEVICE == "cuda" else 4
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
MODES = ["train forward", "train forward+backward", "eval forward"]
CASES = list(itertools.product(MODES, DTYPES, LAYOUTS, [64, 32, 16, 8], backends_for("bn_relu_forward")))


@pytest.mark.parametrize("mode,dtype,layout,level,backend", CASES,
                         ids=[f"{m.replace(' ', '-')}-{str(d)[6:]}-{lay}-{lv}-{b}" for m, d, lay, lv, b in CASES])
def test_bn_relu(benchmark, mode, dtype, layout, level, backend):
    benchmark.group = f"bn_relu {mode} {str(dtype)[6:]} {layout} {level}x{level}"
    backward = mode == "train forward+backward"

    def one_set():  # x (a leaf for the backward) and its grad
        x = torch.randn(BATCH, 256, level, level, device=DEVICE, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
        return (x.requires_grad_(True), torch.randn_like(x)) if backward else (x,)

    sets = rotation(one_set)
    w = torch.rand(256, device=DEVICE, requires_grad=True)
    b = torch.randn(256, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(256, device=DEVICE), torch.ones(256, device=DEVICE)
    training = mode.startswith("train")
    if backward:
        def fn():
            x, grad = sets.next()
            torch.autograd.grad(ops.bn_relu(x, w, b, rm, rv, True, backend=backend), (x, w, b), grad)
            sync()
    else:
        def fn():
            with torch.no_grad():
                ops.bn_relu(sets.next()[0], w, b, rm, rv, training, backend=backend)
            sync()
    benchmark(fn)
    record(benchmark, (mode, dtype, layout, level), backend)
