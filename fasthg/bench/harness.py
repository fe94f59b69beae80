"""How fasthg bench and the pytest-benchmark suite time things: warm-up calls first, then the
candidates round-robin (interleaved) for `repeats` rounds, each reporting its median; CUDA
with events after a synchronize, CPU with a monotonic clock. A ratio `speedup` is eager's
median / the candidate's. Each call of an op takes the next of several input sets, together
twice the last-level cache, so no call finds its inputs in cache from the one before
(`Rotation`)."""
import glob
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from fasthg import device as device_info

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def layout_name(fmt: torch.memory_format) -> str:
    return "nhwc" if fmt == torch.channels_last else "nchw"


def speedup(eager_seconds: float, seconds: float) -> float:
    """The one speedup formula of every report: eager's median over the candidate's, same run."""
    return eager_seconds / seconds


def default_dtypes(dev: torch.device) -> List[torch.dtype]:
    """float32, and bfloat16 where the device computes it natively: GPUs, and CPUs with AMX or
    AVX512_BF16 (elsewhere a CPU converts bf16 to float32 and back, which tells little)."""
    if dev.type == "cuda" or device_info.cpu_computes_bf16():
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


def _timer(device: torch.device) -> Callable[[Callable], float]:
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def interleaved_samples(fns: Dict[str, Callable], device: torch.device, warmup: int = 3,
                        repeats: int = 20) -> Dict[str, List[float]]:
    """Seconds of every call of each function, measured round-robin after `warmup` calls each."""
    timer = _timer(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(timer(fn))
    return samples


# Above this spread a row's repeats disagree too much for its median to mean much (a busy machine).
SPREAD_LIMIT = 0.5


def spread(samples: List[float]) -> float:
    """How much repeated timings of one call disagree: their interquartile range over their
    median (0 for fewer than 3 samples, too few to tell). Robust to a stray slow sample; a
    busy machine (other processes taking the cores) pushes it well above SPREAD_LIMIT."""
    if len(samples) < 3:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


def medians_and_spreads(samples: Dict[str, List[float]]):
    """({name: median seconds}, {name: spread}) of interleaved_samples' result."""
    return ({k: statistics.median(v) for k, v in samples.items()}, {k: spread(v) for k, v in samples.items()})


def interleaved_medians(fns: Dict[str, Callable], device: torch.device, warmup: int = 3,
                        repeats: int = 20) -> Dict[str, float]:
    """Median seconds per call of each function, measured round-robin."""
    return {k: statistics.median(v) for k, v in interleaved_samples(fns, device, warmup, repeats).items()}


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's largest cache (Linux sysfs); 64 MiB where neither says."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 << 20)


class Rotation:
    """Input sets made by make(), as many as it takes for them to hold twice `cache_bytes`
    (at most `limit`); next() gives them round-robin, so a set comes back only after the
    others have pushed it out of the cache."""

    def __init__(self, make: Callable[[], tuple], cache_bytes: int, limit: int = 64):
        first = make()
        size = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
        count = max(1, min(limit, -(-2 * cache_bytes // max(1, size))))
        self.sets = [first] + [make() for _ in range(count - 1)]
        self.i = 0

    def next(self) -> tuple:
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device (or memcpy) copy: read + write."""
    src = torch.empty(mib << 18, device=device).uniform_()
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, warmup=2, repeats=repeats)["copy"]
    return 2 * src.numel() * src.element_size() / t


def compiled(fn, device=None):
    """torch.compile of an eager composition (or model), specialised to each case's shapes.
    Every case compiles the same code objects: each starts from an empty Dynamo cache, so
    no case hits the recompile limit and silently runs eager (and if one did, it fails)."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    if device is None or torch.device(device).type == "cpu":
        # Compile in this process: a pool of compile workers kept both CPUs busy for seconds
        # after each compilation, and whatever was timed next ran slower.
        torch._inductor.config.compile_threads = 1
    return torch.compile(fn, dynamic=False)


def add_run_args(ap, batch: int, files: str, dtypes_help: str) -> None:
    """The options the per-kernel benchmarks (python -m fasthg.bench.conv1x1, .conv2d) share."""
    ap.add_argument("--batch", type=int, default=batch, help="images per batch")
    ap.add_argument("--dtypes", default=None, help=f"comma-separated, e.g. bfloat16,float32 ({dtypes_help})")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds per case")
    ap.add_argument("--out", default=None, help=f"folder for {files}")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="CPU: time with glibc keeping freed memory (as fasthg train does; fasthg.bench.malloc)")


def run_args_dtypes(a) -> Optional[List[torch.dtype]]:
    """add_run_args' dtypes (None: the benchmark's default), after keeping freed memory where asked."""
    if a.keep_freed_memory:
        from fasthg.bench import malloc

        malloc.keep_freed_memory()
    return [getattr(torch, d) for d in a.dtypes.split(",")] if a.dtypes else None


def write_results(out_dir: str, stem: str, device_name: str, rows: List[dict], table: str, chart) -> None:
    """out_dir/stem.json (rows), stem.md (the table) and stem.png (chart(rows, device_name, path),
    where matplotlib is installed): the per-kernel benchmarks' files."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"device": device_name, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(f"{device_name}\n\n{table}\n")
    try:
        chart(rows, device_name, os.path.join(out_dir, f"{stem}.png"))
    except ImportError:  # matplotlib
        pass


def markdown_table(title: str, header: List[str], cells: List[List[str]]) -> str:
    """A title line, then a Markdown table of the header and one row of cells each."""
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)

