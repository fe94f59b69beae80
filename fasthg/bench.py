"""Benchmark harness behind `fasthg bench`: fused ops and the model against eager, timed in
one run so that every ratio compares numbers taken under the same machine load.

Timing: warm-up calls first, then the candidates run round-robin (interleaved) for
`repeats` rounds and each reports its median; CUDA with events after a synchronize, CPU
with a monotonic clock. The ratio `speedup` is eager's median / the backend's median.
"""
import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from tqdm import tqdm

from fasthg import ops
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


def op_cases(op: str, batch: int, channels: int, levels, dtypes, layouts):
    for dtype in dtypes:
        for layout in layouts:
            for hw in levels:
                yield {"op": op, "level": hw, "shape": [batch, channels, hw, hw],
                       "dtype": str(dtype).replace("torch.", ""), "layout": "nhwc" if layout == torch.channels_last else "nchw",
                       "_dtype": dtype, "_layout": layout}


def _rows(case, backends, mode, med):
    return [{**{k: v for k, v in case.items() if not k.startswith("_")}, "mode": mode, "backend": b,
             "median_ms": med[b] * 1e3, "speedup": med["eager"] / med[b]} for b in backends]


def bench_upsample_add(case, device, backends, repeats):
    n, c, hw, _ = case["shape"]
    fmt, dtype = case["_layout"], case["_dtype"]
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype).contiguous(memory_format=fmt)  # noqa: E731
    low, skip, grad = make(n, c, hw // 2, hw // 2), make(n, c, hw, hw), make(n, c, hw, hw)
    lowg, skipg = low.clone().requires_grad_(True), skip.clone().requires_grad_(True)
    fwd = {b: (lambda b=b: ops.upsample_add(low, skip, backend=b)) for b in backends}
    fb = {b: (lambda b=b: torch.autograd.grad(ops.upsample_add(lowg, skipg, backend=b), (lowg, skipg), grad))
          for b in backends}
    rows = []
    for mode, fns in (("forward", fwd), ("forward+backward", fb)):
        rows += _rows(case, backends, mode, interleaved_medians(fns, device, repeats=repeats))
    return rows


def bench_bn_relu(case, device, backends, repeats):
    """Training forward, training forward+backward (grads of x, weight, bias), eval forward."""
    n, c, hw, _ = case["shape"]
    x = torch.randn(n, c, hw, hw, device=device, dtype=case["_dtype"]).contiguous(memory_format=case["_layout"])
    grad = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    w = torch.rand(c, device=device, requires_grad=True)
    b = torch.randn(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    call = lambda inp, be, training: ops.bn_relu(inp, w, b, rm, rv, training, 0.1, 1e-5, backend=be)  # noqa: E731
    modes = {
        "train forward": {be: (lambda be=be: call(x, be, True)) for be in backends},
        "train forward+backward": {be: (lambda be=be: torch.autograd.grad(call(xg, be, True), (xg, w, b), grad))
                                   for be in backends},
        "eval forward": {be: (lambda be=be: call(x, be, False)) for be in backends},
    }
    with torch.no_grad():
        rows = _rows(case, backends, "train forward", interleaved_medians(modes["train forward"], device, repeats=repeats))
        rows += _rows(case, backends, "eval forward", interleaved_medians(modes["eval forward"], device, repeats=repeats))
    rows += _rows(case, backends, "train forward+backward",
                  interleaved_medians(modes["train forward+backward"], device, repeats=repeats))
    return rows


def bench_model(preset: str, device, backends, batch: int, image_size: int, repeats: int):
    """Training step (forward, MSE loss over every stack, backward, SGD) per backend, same weights."""
    torch.manual_seed(0)
    base = PRESETS[preset](backend="eager").to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    target = torch.randn(batch, base.num_stacks, base.num_joints, image_size // 4, image_size // 4, device=device)
    models = {}
    for b in backends:
        m = PRESETS[preset](backend=b).to(device)
        m.load_state_dict(base.state_dict())
        models[b] = m

    optims = {b: torch.optim.SGD(m.parameters(), lr=1e-4) for b, m in models.items()}

    def step(b):
        optims[b].zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(models[b](images), target).backward()
        optims[b].step()

    med = interleaved_medians({b: (lambda b=b: step(b)) for b in models}, device, warmup=1, repeats=repeats)
    return [{"op": f"{preset} train step", "level": image_size, "shape": [batch, 3, image_size, image_size],
             "dtype": "float32", "layout": "nchw", "mode": "forward+backward", "backend": b,
             "median_ms": med[b] * 1e3, "speedup": med["eager"] / med[b], "images_per_s": batch / med[b]}
            for b in backends]


def run(device: str = "auto", levels=(64, 32, 16, 8), repeats: int = 20, model: str = "hg2",
        model_repeats: int = 3, image_size: int = 256, out_dir: str = None, progress: bool = True):
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    gpu = dev.type == "cuda"
    # Per op, the backends with a kernel on this device; the Triton interpreter is not for speed.
    def backends(op=None):
        return [b for b in ops.available(dev.type, op) if gpu or b != "triton"]

    batch = 16 if gpu else 4
    dtypes = [torch.float32, torch.bfloat16] if gpu else [torch.float32]
    layouts = [torch.contiguous_format, torch.channels_last]
    cases = [(bench_upsample_add, backends("upsample_add"), case)
             for case in op_cases("upsample_add", batch, 256, levels, dtypes, layouts)]
    cases += [(bench_bn_relu, backends("bn_relu_forward"), case)
              for case in op_cases("bn_relu", batch, 256, levels, dtypes, layouts)]
    rows = []
    bar = tqdm(total=len(cases) + (1 if model else 0), desc=f"bench on {dev.type}", disable=not progress)
    for fn, op_backends, case in cases:
        bar.set_postfix_str(f'{case["op"]} {case["layout"]} {case["level"]}x{case["level"]} {case["dtype"]}')
        rows += fn(case, dev, op_backends, repeats)
        bar.update()
    if model:
        bar.set_postfix_str(f"{model} training step")
        rows += bench_model(model, dev, backends() + ["auto"], 16 if gpu else 2, image_size, model_repeats)
        bar.update()
    bar.close()
    result = {"device": torch.cuda.get_device_name(dev) if gpu else f"CPU, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "rows": rows}
    if out_dir:
        write_outputs(result, out_dir)
    return result


def table(result) -> str:
    lines = [f"device: {result['device']}, torch {result['torch']} (medians; speedup = eager / backend, same run)",
             "| op | level | layout | dtype | mode | backend | median ms | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['level']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['backend']} | "
                     f"{r['median_ms']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def write_outputs(result, out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(table(result) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in result["rows"] if r["backend"] != "eager"]
    labels = [f"{r['op'].split()[0]} {r['layout']} {r['level']} {r['dtype']}\n{r['mode']} {r['backend']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 5))
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("speedup over eager (x)")
    ax.set_title(f"fasthg vs eager on {result['device']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench.png"), dpi=120)
    plt.close(fig)
