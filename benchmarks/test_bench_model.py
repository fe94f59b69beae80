"""hg2 and hg8 at 256x256 (batch 16 on GPU, 4 on CPU): one training step (forward, loss over
every stack, backward, SGD) and the inference forward (eval mode, no grad), eager against
every backend and torch.compile of the eager model, in NCHW and channels_last, in float32 and
under autocast to each half dtype of the device: fasthg.bench.cases.ModelCase, as `fasthg
bench` times it. extra_info: speedup_vs_eager, images_per_s, peak_mb (fasthg.bench.memory)
and, for the step, saved_mb (activations kept for backward)."""
import itertools

import pytest

from conftest import BATCH, DEVICE, DTYPES, backends_for, note_rate, record, sync
from fasthg.bench import LAYOUTS, ModelCase, dtype_name, memory

BACKENDS = backends_for() + ["auto", "compile"]
CASES = list(itertools.product(["hg2", "hg8"], LAYOUTS, DTYPES, BACKENDS))
IDS = [f"{p}-{layout}-{dtype_name(dtype)}-{b}" for p, layout, dtype, b in CASES]


def timed(fn):
    def run():
        fn()
        sync()
    return run


@pytest.mark.parametrize("preset,layout,dtype,backend", CASES, ids=IDS)
def test_train_step(benchmark, preset, layout, dtype, backend):
    benchmark.group = f"{preset} train step, batch {BATCH}, 256x256, {layout}, {dtype_name(dtype)}"
    case = ModelCase(preset, DEVICE, [backend], BATCH, 256, LAYOUTS[layout], dtype)
    step = timed(case.step[backend])
    step()  # warm-up (and compilation) outside the timing
    benchmark.pedantic(step, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    record(benchmark, (preset, layout, dtype), backend)
    note_rate(benchmark, "images_per_s", BATCH)
    benchmark.extra_info["peak_mb"] = round(memory.peak_bytes(step, DEVICE) / 2**20, 1)
    benchmark.extra_info["saved_mb"] = round(case.saved_activation_bytes(backend) / 2**20, 1)


@pytest.mark.parametrize("preset,layout,dtype,backend", CASES, ids=IDS)
def test_forward(benchmark, preset, layout, dtype, backend):
    benchmark.group = f"{preset} inference forward, batch {BATCH}, 256x256, {layout}, {dtype_name(dtype)}"
    case = ModelCase(preset, DEVICE, [backend], BATCH, 256, LAYOUTS[layout], dtype)
    case.eval()
    run = timed(case.infer[backend])
    run()  # warm-up (and compilation) outside the timing
    benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, warmup_rounds=1)
    record(benchmark, ("forward", preset, layout, dtype), backend)
    note_rate(benchmark, "images_per_s", BATCH)
    benchmark.extra_info["peak_mb"] = round(memory.peak_bytes(run, DEVICE) / 2**20, 1)
