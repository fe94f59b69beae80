"""hg2 and hg8 at 256x256 (batch 16 on GPU, 4 on CPU): the inference forward (eval mode, no
grad) and one training step (forward, loss over every stack, backward, SGD), eager against
every backend and torch.compile of the eager model, in NCHW and channels_last, in float32 and
under autocast to each half dtype of the device. extra_info: speedup_vs_eager, images_per_s,
peak_mb (fasthg.memory) and, for the step, saved_mb (activations kept for backward)."""
import itertools

import pytest
import torch

from conftest import BATCH, DEVICE, DTYPES, LAYOUTS, backends_for, compiled, note_rate, record, sync
from fasthg import memory
from fasthg.bench import dtype_name
from fasthg.models import PRESETS

BACKENDS = backends_for("bn_relu_forward") + ["auto", "compile"]
CASES = list(itertools.product(["hg2", "hg8"], LAYOUTS, DTYPES, BACKENDS))
IDS = [f"{p}-{layout}-{dtype_name(dtype)}-{b}" for p, layout, dtype, b in CASES]


def setup(preset, layout, dtype, backend, training=True):
    """The model in `layout` and train or eval mode, its forward (compiled for "compile",
    under autocast to `dtype` unless float32), and images in `layout`."""
    torch.manual_seed(0)
    model = PRESETS[preset](backend="eager" if backend == "compile" else backend).to(DEVICE)
    model = model.to(memory_format=LAYOUTS[layout]).train(training)
    run = compiled(model, DEVICE) if backend == "compile" else model
    images = torch.randn(BATCH, 3, 256, 256, device=DEVICE).contiguous(memory_format=LAYOUTS[layout])

    def forward(x):
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype != torch.float32):
            return run(x)
    return model, forward, images


@pytest.mark.parametrize("preset,layout,dtype,backend", CASES, ids=IDS)
def test_train_step(benchmark, preset, layout, dtype, backend):
    benchmark.group = f"{preset} train step, batch {BATCH}, 256x256, {layout}, {dtype_name(dtype)}"
    model, forward, images = setup(preset, layout, dtype, backend)
    target = torch.randn(BATCH, model.num_stacks, model.num_joints, 64, 64, device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(forward(images).float(), target).backward()
        opt.step()
        sync()

    step()  # warm-up (and compilation) outside the timing
    benchmark.pedantic(step, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    record(benchmark, (preset, layout, dtype), backend)
    note_rate(benchmark, "images_per_s", BATCH)
    benchmark.extra_info["peak_mb"] = round(memory.peak_bytes(step, DEVICE) / 2**20, 1)
    benchmark.extra_info["saved_mb"] = round(
        memory.saved_activation_bytes(lambda: forward(images), model.parameters()) / 2**20, 1)


@pytest.mark.parametrize("preset,layout,dtype,backend", CASES, ids=IDS)
def test_forward(benchmark, preset, layout, dtype, backend):
    benchmark.group = f"{preset} inference forward, batch {BATCH}, 256x256, {layout}, {dtype_name(dtype)}"
    _, forward, images = setup(preset, layout, dtype, backend, training=False)

    def run():
        with torch.no_grad():
            forward(images)
        sync()

    run()  # warm-up (and compilation) outside the timing
    benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    record(benchmark, ("forward", preset, layout, dtype), backend)
    note_rate(benchmark, "images_per_s", BATCH)
    benchmark.extra_info["peak_mb"] = round(memory.peak_bytes(run, DEVICE) / 2**20, 1)
