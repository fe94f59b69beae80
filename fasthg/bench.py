"""Benchmark harness behind `fasthg bench`: fused ops and the model against eager, timed in
one run so that every ratio compares numbers taken under the same machine load.

Timing: warm-up calls first, then the candidates run round-robin (interleaved) for
`repeats` rounds and each reports its median; CUDA with events after a synchronize, CPU
with a monotonic clock. The ratio `speedup` is eager's median / the backend's median.
Each call of an op takes the next of several input sets, together twice the last-level
cache, so no call finds its inputs in cache from the one before (`Rotation`).

Against the hardware's limit: each op row carries the bytes a fused kernel must move (a
counted model: every tensor read or written once per pass) and the GB/s that makes at the
measured time, as a fraction of a large copy's bandwidth timed in the same run. Memory: the
peak bytes each call allocates (fasthg.memory) and, for the model, the activation bytes
saved for backward. `compile` is torch.compile of the eager composition.
"""
import glob
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

from fasthg import memory, ops, reference
from fasthg import device as device_info
from fasthg.device import resolve as resolve_device
from fasthg.models import PRESETS


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


def interleaved_medians(fns: Dict[str, Callable], device: torch.device, warmup: int = 3,
                        repeats: int = 20) -> Dict[str, float]:
    """Median seconds per call of each function, measured round-robin."""
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
    return {k: statistics.median(v) for k, v in samples.items()}


# Bytes a fused kernel moves, in units of one full-resolution tensor (N*C*H*W elements):
# upsample_add reads low (1/4) and skip, writes out; its backward reads grad and writes
# grad_low (1/4; grad_skip is grad). bn_relu's training forward reads x for the statistics,
# then reads x and writes y; its backward reads grad and x to reduce, then grad and x again
# to write grad_x; eval reads x and writes y.
TRAFFIC = {("upsample_add", "forward"): 2.25, ("upsample_add", "forward+backward"): 3.5,
           ("bn_relu", "train forward"): 3.0, ("bn_relu", "train forward+backward"): 8.0,
           ("bn_relu", "eval forward"): 2.0}


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


def hourglass_shapes(preset: str = "hg2", image_size: int = 256) -> Dict[str, List[tuple]]:
    """The (channels, height, width) at which a model runs each fused op, from one forward
    on the meta device (no memory, no compute): the inputs of its BN-ReLUs and the outputs
    (skip's shape) of its upsample-adds, sorted largest first."""
    from fasthg.models.hourglass import Hourglass
    from fasthg.nn import BNReLU

    model = PRESETS[preset](backend="eager").to("meta")
    seen = {"bn_relu": set(), "upsample_add": set()}
    for m in model.modules():
        if isinstance(m, BNReLU):
            m.register_forward_pre_hook(lambda _, inp: seen["bn_relu"].add(tuple(inp[0].shape[1:])))
        elif isinstance(m, Hourglass):
            m.register_forward_hook(lambda _, inp, out: seen["upsample_add"].add(tuple(out.shape[1:])))
    model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return {op: sorted(shapes, key=lambda s: (-s[1] * s[2], -s[0])) for op, shapes in seen.items()}


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device (or memcpy) copy: read + write."""
    src = torch.empty(mib << 18, device=device).uniform_()
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, warmup=2, repeats=repeats)["copy"]
    return 2 * src.numel() * src.element_size() / t


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def layout_name(fmt: torch.memory_format) -> str:
    return "nhwc" if fmt == torch.channels_last else "nchw"


def op_cases(op: str, batch: int, channels: int, levels, dtypes, layouts):
    for dtype in dtypes:
        for layout in layouts:
            for hw in levels:
                yield {"op": op, "level": hw, "shape": [batch, channels, hw, hw],
                       "dtype": dtype_name(dtype), "layout": layout_name(layout),
                       "_dtype": dtype, "_layout": layout}


def _rows(case, fns, mode, med, device):
    n, c, h, w = case["shape"]
    moved = TRAFFIC[case["op"], mode] * n * c * h * w * case["_dtype"].itemsize
    return [{**{k: v for k, v in case.items() if not k.startswith("_")}, "mode": mode, "backend": b,
             "median_ms": med[b] * 1e3, "speedup": med["eager"] / med[b], "bytes": moved,
             "gb_s": moved / med[b] / 1e9, "peak_mb": memory.peak_bytes(fn, device) / 2**20}
            for b, fn in fns.items()]


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
        # Compile in this process: a pool of compile workers kept both CPUs of the
        # development machine busy for seconds after each compilation, and whatever was
        # timed next ran up to 10x slower.
        torch._inductor.config.compile_threads = 1
    return torch.compile(fn, dynamic=False)


def bench_upsample_add(case, device, backends, repeats, compile=False, cache_bytes=0):
    n, c, hw, _ = case["shape"]
    fmt, dtype = case["_layout"], case["_dtype"]
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731

    def one_set():  # low, skip, grad, and leaf copies of low and skip for the backward
        low, skip = make(n, c, hw // 2, hw // 2), make(n, c, hw, hw)
        return low, skip, make(n, c, hw, hw), low.clone().requires_grad_(True), skip.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)

    def fwd_of(f):
        def run():
            low, skip = sets.next()[:2]
            return f(low, skip)
        return run

    def fb_of(f):
        def run():
            _, _, grad, lowg, skipg = sets.next()
            return torch.autograd.grad(f(lowg, skipg), (lowg, skipg), grad)
        return run

    fwd = {b: fwd_of(lambda lo, sk, b=b: ops.upsample_add(lo, sk, backend=b)) for b in backends}
    fb = {b: fb_of(lambda lo, sk, b=b: ops.upsample_add(lo, sk, backend=b)) for b in backends}
    if compile:
        f = compiled(reference.upsample_add, device)
        fwd["compile"], fb["compile"] = fwd_of(f), fb_of(f)
    rows = []
    for mode, fns in (("forward", fwd), ("forward+backward", fb)):
        rows += _rows(case, fns, mode, interleaved_medians(fns, device, repeats=repeats), device)
    return rows


def bench_bn_relu(case, device, backends, repeats, compile=False, cache_bytes=0):
    """Training forward, training forward+backward (grads of x, weight, bias), eval forward."""
    n, c, hw, _ = case["shape"]

    def one_set():  # x, grad, and a leaf copy of x for the backward
        x = torch.randn(n, c, hw, hw, device=device, dtype=case["_dtype"]).contiguous(memory_format=case["_layout"])
        return x, torch.randn_like(x), x.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    w = torch.rand(c, device=device, requires_grad=True)
    b = torch.randn(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    call = lambda inp, be, training: ops.bn_relu(inp, w, b, rm, rv, training, 0.1, 1e-5, backend=be)  # noqa: E731

    def forward_of(f):
        return lambda: f(sets.next()[0])

    def fb_of(f):
        def run():
            _, grad, xg = sets.next()
            return torch.autograd.grad(f(xg), (xg, w, b), grad)
        return run

    modes = {
        "train forward": {be: forward_of(lambda inp, be=be: call(inp, be, True)) for be in backends},
        "train forward+backward": {be: fb_of(lambda inp, be=be: call(inp, be, True)) for be in backends},
        "eval forward": {be: forward_of(lambda inp, be=be: call(inp, be, False)) for be in backends},
    }
    if compile:  # relu(batch_norm(x)) compiled, the running-statistics update included
        train = compiled(lambda inp: reference.bn_relu(inp, w, b, rm, rv, True, 0.1, 1e-5), device)
        infer = compiled(lambda inp: reference.bn_relu(inp, w, b, rm, rv, False, 0.1, 1e-5), device)
        modes["train forward"]["compile"] = forward_of(train)
        modes["train forward+backward"]["compile"] = fb_of(train)
        modes["eval forward"]["compile"] = forward_of(infer)
    rows = []
    for mode in ("train forward", "eval forward", "train forward+backward"):
        with torch.no_grad() if "backward" not in mode else torch.enable_grad():
            rows += _rows(case, modes[mode], mode, interleaved_medians(modes[mode], device, repeats=repeats), device)
    return rows


def bench_model(preset: str, device, backends, batch: int, image_size: int, repeats: int, compile=False,
                layout=torch.contiguous_format, dtype=torch.float32):
    """Training step (forward, MSE loss over every stack, backward, SGD) per backend, same
    weights, then the inference forward (eval mode, no grad); `compile` adds torch.compile of
    the eager model. Model and images in `layout`; a dtype other than float32 runs the
    forward under autocast to it, as `fasthg train --amp` does. Rows carry images/s, the
    peak bytes a call allocates and, for the step, the activation bytes saved for its backward."""
    torch.manual_seed(0)
    base = PRESETS[preset](backend="eager").to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    target = torch.randn(batch, base.num_stacks, base.num_joints, image_size // 4, image_size // 4, device=device)
    models, forwards = {}, {}
    for b in backends + (["compile"] if compile else []):
        m = PRESETS[preset](backend="eager" if b == "compile" else b).to(device)
        m.load_state_dict(base.state_dict())
        m = m.to(memory_format=layout)
        models[b], forwards[b] = m, (compiled(m, device) if b == "compile" else m)
    optims = {b: torch.optim.SGD(m.parameters(), lr=1e-4) for b, m in models.items()}
    amp = dtype != torch.float32

    def forward(b):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return forwards[b](images)

    def step(b):
        optims[b].zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(forward(b).float(), target).backward()
        optims[b].step()

    def row(what, mode, b, med, fn, **extra):
        return {"op": f"{preset} {what}", "level": image_size, "shape": [batch, 3, image_size, image_size],
                "dtype": dtype_name(dtype), "layout": layout_name(layout),
                "mode": mode, "backend": b, "median_ms": med[b] * 1e3,
                "speedup": med["eager"] / med[b], "images_per_s": batch / med[b],
                "peak_mb": memory.peak_bytes(fn, device) / 2**20, **extra}

    def infer(b):
        with torch.no_grad():
            forward(b)

    warmup = 2 if compile else 1
    fns = {b: (lambda b=b: step(b)) for b in models}
    med = interleaved_medians(fns, device, warmup=warmup, repeats=repeats)
    rows = [row("train step", "forward+backward", b, med, fn,
                saved_mb=memory.saved_activation_bytes(lambda: forward(b), models[b].parameters()) / 2**20)
            for b, fn in fns.items()]
    for m in models.values():
        m.eval()
    fns = {b: (lambda b=b: infer(b)) for b in models}
    med = interleaved_medians(fns, device, warmup=warmup, repeats=repeats)
    return rows + [row("inference", "forward", b, med, fn) for b, fn in fns.items()]


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def default_dtypes(dev: torch.device) -> List[torch.dtype]:
    """float32, and bfloat16 where the device computes it natively: GPUs, and CPUs with AMX or
    AVX512_BF16 (elsewhere a CPU converts bf16 to float32 and back, which tells little)."""
    if dev.type == "cuda" or device_info.cpu_computes_bf16():
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


def run(device: str = "auto", levels=(64, 32, 16, 8), channels=(256,), repeats: int = 20, models=("hg2",),
        model_repeats: int = 3, image_size: int = 256, compile: bool = False, out_dir: str = None,
        progress: bool = True, keep_freed_memory: bool = False, dtypes=None, model_layouts=("nchw", "nhwc")):
    """keep_freed_memory (CPU): time with glibc keeping freed memory (fasthg.malloc), so
    that page faults of fresh outputs do not swamp the kernels; process-wide. dtypes: the
    ops' activation dtypes and the models' (float32, or autocast to the others; default:
    default_dtypes). model_layouts: nchw and/or nhwc (channels_last)."""
    dev = resolve_device(device)
    gpu = dev.type == "cuda"
    allocator = "CUDA caching allocator" if gpu else "malloc, default"
    if keep_freed_memory and not gpu:
        from fasthg import malloc

        allocator = "glibc malloc, freed memory kept" if malloc.keep_freed_memory() else allocator
    # Per op, the backends with a kernel on this device; the Triton interpreter is not for speed.
    def backends(op=None):
        return [b for b in ops.available(dev.type, op) if gpu or b != "triton"]

    batch = 16 if gpu else 4
    dtypes = dtypes or default_dtypes(dev)
    layouts = list(LAYOUTS.values())
    cases = []
    for c in channels:
        cases += [(bench_upsample_add, backends("upsample_add"), case)
                  for case in op_cases("upsample_add", batch, c, levels, dtypes, layouts)]
        cases += [(bench_bn_relu, backends("bn_relu_forward"), case)
                  for case in op_cases("bn_relu", batch, c, levels, dtypes, layouts)]
    cache_bytes = last_level_cache_bytes(dev)
    rows = []
    model_cases = [(preset, LAYOUTS[lay], dtype) for preset in models for lay in model_layouts for dtype in dtypes]
    bar = tqdm(total=len(cases) + len(model_cases) + 1, desc=f"bench on {dev.type}", disable=not progress)
    bar.set_postfix_str("copy bandwidth")
    copy_bw = copy_bandwidth(dev)
    bar.update()

    def result(complete):
        for r in rows:
            if "gb_s" in r:
                r["of_copy"] = r["gb_s"] * 1e9 / copy_bw
        return {"device": torch.cuda.get_device_name(dev) if gpu else f"CPU, {torch.get_num_threads()} threads",
                "torch": torch.__version__, "allocator": allocator, "copy_gb_s": copy_bw / 1e9,
                "cache_mib": cache_bytes / 2**20, "complete": complete, "rows": rows,
                "bars": [] if gpu else bar_checks(rows)}  # the bars are set for the CPU

    def done_one(new_rows):  # the JSON and table so far, so that a run cut short keeps what it measured
        rows.extend(new_rows)
        bar.update()
        if out_dir:
            write_outputs(result(False), out_dir, chart=False)

    for fn, op_backends, case in cases:
        bar.set_postfix_str(f'{case["op"]} {case["layout"]} {case["shape"][1]}x{case["level"]}x{case["level"]} '
                            f'{case["dtype"]}')
        done_one(fn(case, dev, op_backends, repeats, compile, cache_bytes))
    for preset, layout, dtype in model_cases:
        bar.set_postfix_str(f"{preset} training step {layout_name(layout)} {dtype_name(dtype)}")
        done_one(bench_model(preset, dev, backends() + ["auto"], batch, image_size, model_repeats, compile,
                             layout, dtype))
    bar.close()
    final = result(True)
    if out_dir:
        write_outputs(final, out_dir)
    return final


# The speedups over eager that the op issues set for the native backend on the CPU: each
# fused op's forward+backward at the 64x64 and 32x32 levels, in float32 (the default dtype).
BARS = {("upsample_add", "forward+backward"): 2.0, ("bn_relu", "train forward+backward"): 1.6}
BAR_LEVELS = (64, 32)


def bar_checks(rows) -> List[Dict]:
    """Every native row of this run that a bar applies to: its speedup, the bar, and whether it is met."""
    return [{"op": r["op"], "mode": r["mode"], "level": r["level"], "channels": r["shape"][1], "layout": r["layout"],
             "dtype": r["dtype"], "speedup": r["speedup"], "bar": BARS[r["op"], r["mode"]],
             "met": r["speedup"] >= BARS[r["op"], r["mode"]]}
            for r in rows if r["backend"] == "native" and r["level"] in BAR_LEVELS and (r["op"], r["mode"]) in BARS
            and r["dtype"] == "float32"]


def table(result) -> str:
    lines = ([] if result.get("complete", True) else ["(incomplete: the rows measured so far)"]) + [
             f"device: {result['device']}, torch {result['torch']}, {result['allocator']}; "
             f"copy bandwidth {result['copy_gb_s']:.1f} GB/s; op inputs rotated through "
             f"{2 * result.get('cache_mib', 0):.0f} MiB (twice the last-level cache) "
             "(medians; speedup = eager / backend, same run)",
             "| op | shape | layout | dtype | mode | backend | median ms | speedup | GB/s | of copy | peak MB "
             "| img/s | saved MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    opt = lambda r, k, f: format(r[k], f) if k in r else ""  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['mode']} "
                     f"| {r['backend']} | {r['median_ms']:.3f} | {r['speedup']:.2f}x | {opt(r, 'gb_s', '.1f')} "
                     f"| {opt(r, 'of_copy', '.0%')} | {r['peak_mb']:.1f} | {opt(r, 'images_per_s', '.1f')} "
                     f"| {opt(r, 'saved_mb', '.0f')} |")
    checks = result.get("bars", [])
    if checks:
        lines += ["", f"Bars (native vs eager, same run): {sum(c['met'] for c in checks)} of {len(checks)} met"]
        lines += [f"- {c['op']} {c['mode']} {c['channels']}x{c['level']}x{c['level']} {c['layout']} {c['dtype']}: "
                  f"{c['speedup']:.2f}x, bar {c['bar']:.1f}x: {'met' if c['met'] else 'NOT met'}" for c in checks]
    return "\n".join(lines)


def _write_atomic(path: str, text: str):
    """Replaces path with text in one rename: a reader (or a run killed mid-write) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(result, out_dir: str, chart: bool = True):
    """bench.json and bench.md, and with `chart` bench.png (fasthg.bench_chart)."""
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, "bench.json"), json.dumps(result, indent=1))
    _write_atomic(os.path.join(out_dir, "bench.md"), table(result) + "\n")
    if not chart:
        return
    try:
        from fasthg.bench_chart import speedup_chart
        speedup_chart(result, os.path.join(out_dir, "bench.png"), BARS, BAR_LEVELS)
    except ImportError:  # matplotlib
        return
