import pytest
import torch

import fasthg
from fasthg.bench import Rotation, last_level_cache_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CACHE_BYTES = last_level_cache_bytes(torch.device(DEVICE))


def rotation(make):
    """Input sets from make() that together hold twice the last-level cache, taken in turn
    by .next(): no call finds its inputs in cache from the call before (fasthg.bench)."""
    return Rotation(make, CACHE_BYTES)


def backends_for(op: str):
    """The backends with a kernel for `op` here. The Triton interpreter is for correctness,
    not speed: Triton is benchmarked on GPUs only."""
    return [b for b in fasthg.ops.available(DEVICE, op) if DEVICE == "cuda" or b != "triton"]


_EAGER_MEDIANS = {}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def record(benchmark, key, backend):
    """After benchmark(fn): note eager's median for `key` and give other backends the ratio
    eager / backend (eager runs first in every group, in the same session)."""
    median = benchmark.stats.stats.median
    if backend == "eager":
        _EAGER_MEDIANS[key] = median
    elif key in _EAGER_MEDIANS:
        benchmark.extra_info["speedup_vs_eager"] = round(_EAGER_MEDIANS[key] / median, 3)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu x{torch.get_num_threads()}"


@pytest.fixture
def device():
    return DEVICE
