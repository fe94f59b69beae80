"""What the pytest-benchmark suites share: the device, batch, dtypes and shapes, and the
speedup over eager recorded in extra_info. The timed calls themselves come from
fasthg.bench.cases, the same as `fasthg bench` times."""
import pytest
import torch

import fasthg
import fasthg.bench.malloc
from fasthg.bench import benchmark_shapes, last_level_cache_bytes, speedup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # time the kernels, not the page faults of fresh outputs (see fasthg.bench.malloc)
    fasthg.bench.malloc.keep_freed_memory()
CACHE_BYTES = last_level_cache_bytes(torch.device(DEVICE))
BATCH = 16 if DEVICE == "cuda" else 4
# Half precision where the device computes it: bf16 on CPUs, bf16 and fp16 on GPUs.
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE == "cuda" else [])
# (channels, height, width) of every fused op call in hg2 at 256x256, from the model itself
# (bn_add_relu, which the hourglass has not: ResNet-50's block outputs).
SHAPES = benchmark_shapes("hg2", 256)


def backends_for(op: str = None):
    """The backends with a kernel for `op` (default: every fused op) here. The Triton
    interpreter is for correctness, not speed: Triton is benchmarked on GPUs only."""
    return [b for b in fasthg.ops.available(DEVICE, op) if DEVICE == "cuda" or b != "triton"]


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}x{shape[2]}"


_EAGER_MEDIANS = {}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def note_rate(benchmark, key, count, digits=2):
    """extra_info[key] = count / median seconds (samples/s, images/s), where there are timings
    (none under --benchmark-disable)."""
    if benchmark.stats is not None:
        benchmark.extra_info[key] = round(count / benchmark.stats.stats.median, digits)


def record(benchmark, key, backend):
    """After benchmark(fn): note eager's median for `key` and give other backends the ratio
    fasthg.bench.speedup(eager, backend) (eager runs first in every group, in the same
    session). Under --benchmark-disable (each case run once, as a smoke test) there is
    nothing to record."""
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    if backend == "eager":
        _EAGER_MEDIANS[key] = median
    elif key in _EAGER_MEDIANS:
        benchmark.extra_info["speedup_vs_eager"] = round(speedup(_EAGER_MEDIANS[key], median), 3)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu x{torch.get_num_threads()}"


@pytest.fixture
def device():
    return DEVICE
