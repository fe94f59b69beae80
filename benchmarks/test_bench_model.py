"""hg2 and hg8 at 256x256 (batch 16 on GPU, 4 on CPU): the inference forward (eval mode, no
grad) and one training step (forward, loss over every stack, backward, SGD), eager against
every backend and torch.compile of the eager model. extra_info: speedup_vs_eager,
images_per_s, peak_mb (fasthg.memory) and, for the step, saved_mb (activations kept for
backward)."""
import itertools

import pytest
import torch

from conftest import BATCH, DEVICE, backends_for, compiled, record, sync
from fasthg import memory
from fasthg.models import PRESETS

BACKENDS = backends_for("bn_relu_forward") + ["auto", "compile"]
CASES = list(itertools.product(["hg2", "hg8"], BACKENDS))


@pytest.mark.parametrize("preset,backend", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_train_step(benchmark, preset, backend):
    benchmark.group = f"{preset} train step, batch {BATCH}, 256x256"
    torch.manual_seed(0)
    model = PRESETS[preset](backend="eager" if backend == "compile" else backend).to(DEVICE)
    forward = compiled(model, DEVICE) if backend == "compile" else model
    images = torch.randn(BATCH, 3, 256, 256, device=DEVICE)
    target = torch.randn(BATCH, model.num_stacks, model.num_joints, 64, 64, device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(forward(images), target).backward()
        opt.step()
        sync()

    step()  # warm-up (and compilation) outside the timing
    benchmark.pedantic(step, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    record(benchmark, preset, backend)
    benchmark.extra_info["images_per_s"] = round(BATCH / benchmark.stats.stats.median, 2)
    benchmark.extra_info["peak_mb"] = round(memory.peak_bytes(step, DEVICE) / 2**20, 1)
    benchmark.extra_info["saved_mb"] = round(
        memory.saved_activation_bytes(lambda: forward(images), model.parameters()) / 2**20, 1)


@pytest.mark.parametrize("preset,backend", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_forward(benchmark, preset, backend):
    benchmark.group = f"{preset} inference forward, batch {BATCH}, 256x256"
    torch.manual_seed(0)
    model = PRESETS[preset](backend="eager" if backend == "compile" else backend).to(DEVICE).eval()
    forward = compiled(model, DEVICE) if backend == "compile" else model
    images = torch.randn(BATCH, 3, 256, 256, device=DEVICE)

    def run():
        with torch.no_grad():
            forward(images)
        sync()

    run()  # warm-up (and compilation) outside the timing
    benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    record(benchmark, ("forward", preset), backend)
    benchmark.extra_info["images_per_s"] = round(BATCH / benchmark.stats.stats.median, 2)
    benchmark.extra_info["peak_mb"] = round(memory.peak_bytes(run, DEVICE) / 2**20, 1)
