"""Benchmark of the fused BN-ReLU-conv1x1 unit (fasthg.ops.conv1x1: native on the CPU, Triton
on a GPU) against what runs without it: the fused BN-ReLU (native, else eager) then cuDNN's (or
oneDNN's) 1x1 convolution, then the next BN's statistics pass; forward, and forward+backward
(gradients of x, the BN's weight and bias, the convolution's weight and bias). Both sides take
x's batch statistics in the timed call (the unit's from one bn_relu_stats pass). At the
hourglass's residual-module shapes (256 -> 128 and 128 -> 256 channels), channels_last, timed
round-robin with fasthg.bench.harness over inputs rotated through twice the last-level cache,
with each row's compulsory bytes (fasthg.bench.traffic) and the GB/s they make.

    python -m fasthg.bench.conv1x1 --device cuda --out DIR   (benchmarks/gpu_check.sh runs it)
    python -m fasthg.bench.conv1x1 --device cpu --batch 4 --out DIR   (the native unit)

Float32 convolutions on both sides are IEEE float32 (cuDNN's TF32 is switched off while
timing, as the Triton kernels' float32 dots are IEEE), so both compute the same thing.
"""
import argparse
import json
import os
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from fasthg import ops
from fasthg.bench import traffic
from fasthg.bench.harness import Rotation, dtype_name, last_level_cache_bytes, medians_and_spreads, interleaved_samples
from fasthg.device import cpu_description, resolve as resolve_device
from fasthg.ops import conv1x1 as unit
from fasthg.ops.conv1x1 import bn_relu_conv1x1

UNITS = traffic.UNITS
LEVELS = (64, 32, 16)


def _batch_stats(t, native: bool):
    """A training BN's statistics pass over t, (mean, biased var) per channel in the statistics'
    dtype: the native kernel's where the BN-ReLU has it, as the model runs it. The unfused side
    takes it over y for the next BN (the fused unit's epilogue does this), the fused over x."""
    if native:
        return torch.ops.fasthg.bn_relu_stats(t)
    var, mean = torch.var_mean(t.to(torch.float64 if t.dtype == torch.float64 else torch.float32), dim=(0, 2, 3),
                               correction=0)
    return mean, var


def fused_backend(device, backend: str = "auto") -> str:
    """The unit's backend the benchmark times on `device` (native on the CPU where it is built)."""
    return unit.resolve(backend, torch.empty(0, device=device))


def calls(n: int, cin: int, cout: int, hw: int, dtype, device, cache_bytes: int = 0,
          backend: str = "auto") -> Dict[str, Dict[str, Callable]]:
    """{mode: {"unfused": fn, <the unit's backend>: fn}} for one shape."""
    which = fused_backend(device, backend)
    p = torch.float32 if dtype != torch.float64 else torch.float64

    def one_set():
        x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(n, cout, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return x, gy, x.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    bn_w = torch.rand(cin, device=device, dtype=p).add_(0.5).requires_grad_(True)
    bn_b = torch.randn(cin, device=device, dtype=p).requires_grad_(True)
    conv_w = (torch.randn(cout, cin, 1, 1, device=device, dtype=dtype) / cin ** 0.5).requires_grad_(True)
    conv_b = torch.randn(cout, device=device, dtype=dtype).requires_grad_(True)
    rm, rv = torch.zeros(cin, device=device, dtype=p), torch.ones(cin, device=device, dtype=p)
    bn_backend = "native" if "native" in ops.available(torch.device(device).type, "bn_relu") else "eager"

    def unfused(x):
        y = F.conv2d(ops.bn_relu(x, bn_w, bn_b, rm, rv, training=True, backend=bn_backend), conv_w, conv_b)
        return y, _batch_stats(y.detach(), bn_backend == "native")

    def fused(x):
        with torch.no_grad():  # x's statistics, as a training BN takes them (bn_relu_conv does this)
            mean, var = _batch_stats(x, bn_backend == "native")
            invstd = torch.rsqrt(var + 1e-5)
        return bn_relu_conv1x1(x, mean, invstd, bn_w, bn_b, conv_w, conv_b, training=True, out_stats=True,
                               backend=which)

    def forward_of(b):
        def run():
            x, *_ = sets.next()
            with torch.no_grad():
                return unfused(x) if b == "unfused" else fused(x)
        return run

    def fb_of(b):
        def run():
            _, gy, xg = sets.next()
            y = unfused(xg)[0] if b == "unfused" else fused(xg)[0]
            return torch.autograd.grad(y, (xg, bn_w, bn_b, conv_w, conv_b), gy)
        return run

    return {mode: {b: make(b) for b in ("unfused", which)}
            for mode, make in (("forward", forward_of), ("forward+backward", fb_of))}


def run(device: str = "auto", levels=LEVELS, units=UNITS, batch: int = 16, dtypes=None, repeats: int = 20,
        warmup: int = 3, out_dir: str = None, backend: str = "auto") -> List[dict]:
    dev = resolve_device(device)
    which = fused_backend(dev, backend)
    # bf16 wherever the unit has it (the Triton interpreter has none)
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if dev.type == "cuda" or which == "native" else [torch.float32])
    cache = last_level_cache_bytes(dev)
    rows = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for dtype in dtypes:
            for hw in levels:
                for cin, cout in units:
                    size = torch.tensor([], dtype=dtype).element_size()
                    moved = traffic.bn_relu_conv1x1_bytes(batch, hw, hw, cin, cout, size)
                    x_bytes = batch * hw * hw * cin * size
                    for mode, fns in calls(batch, cin, cout, hw, dtype, dev, cache, which).items():
                        with torch.enable_grad():
                            med, spreads = medians_and_spreads(interleaved_samples(fns, dev, warmup, repeats))
                        for b in fns:
                            kind = {"triton": "fused", "native": "native"}.get(b, "unfused")
                            byts = moved[f"{kind} forward"] + (moved[f"{kind} backward"] if mode != "forward" else 0)
                            byts += x_bytes if kind == "fused" else 0  # Triton's rows time x's statistics too
                            rows.append({"op": "bn_relu_conv1x1", "dtype": dtype_name(dtype), "level": hw,
                                         "cin": cin, "cout": cout, "batch": batch, "mode": mode, "backend": b,
                                         "median_ms": med[b] * 1e3, "spread": spreads[b],
                                         "speedup": med["unfused"] / med[b], "bytes": byts,
                                         "gb_s": byts / med[b] / 1e9})
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_description()
        with open(os.path.join(out_dir, "conv1x1.json"), "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)
        with open(os.path.join(out_dir, "conv1x1.md"), "w") as f:
            f.write(f"{name}\n\n{table(rows)}\n")
        try:
            chart(rows, name, os.path.join(out_dir, "conv1x1.png"))
        except ImportError:  # matplotlib
            pass
    return rows


def chart(rows, device_name: str, path: str) -> None:
    """conv1x1.png: the unit's speedup over the unfused composition, a panel per mode, the
    shapes along x, a bar per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = [r for r in rows if r["backend"] != "unfused"]
    modes = list(dict.fromkeys(r["mode"] for r in fused))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        these = [r for r in fused if r["mode"] == mode]
        groups = list(dict.fromkeys(f"{r['cin']}->{r['cout']}\n{r['level']}x{r['level']}" for r in these))
        dtypes = list(dict.fromkeys(r["dtype"] for r in these))
        width = 0.8 / len(dtypes)
        for k, dt in enumerate(dtypes):
            vals = {f"{r['cin']}->{r['cout']}\n{r['level']}x{r['level']}": r["speedup"] for r in these if r["dtype"] == dt}
            xs = [g + (k - (len(dtypes) - 1) / 2) * width for g in range(len(groups)) if groups[g] in vals]
            ys = [vals[g] for g in groups if g in vals]
            bars = ax.bar(xs, ys, width, label=f"{dt} {these[0]['backend']}")
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, padding=1)
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speedup over BN-ReLU + conv (x)", fontsize=8)
        ax.set_title(f"bn_relu_conv1x1 {mode}, batch {these[0]['batch']}, channels_last", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"fused BN-ReLU-conv1x1 unit on {device_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp", dpi=110, format="png")
    plt.close(fig)
    os.replace(f"{path}.tmp", path)


def table(rows) -> str:
    which = next((r["backend"] for r in rows if r["backend"] != "unfused"), "fused")
    conv = "oneDNN" if which == "native" else "cuDNN"
    lines = [f"bn_relu_conv1x1: {which} (fused, x's statistics included) vs fused BN-ReLU + {conv} conv + "
             f"statistics pass (unfused), channels_last; speedup = unfused / {which}, same run",
             "| dtype | shape | Cin->Cout | mode | backend | median ms | spread | speedup | GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']}x{r['level']}x{r['level']} | {r['cin']}->{r['cout']} | {r['mode']} "
                     f"| {r['backend']} | {r['median_ms']:.3f} | {r['spread']:.0%} | {r['speedup']:.2f}x "
                     f"| {r['gb_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fasthg.bench.conv1x1", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--backend", default="auto", choices=unit.BACKENDS,
                    help="the unit's backend (auto: native on the CPU, Triton on CUDA; triton on the CPU is the "
                         "interpreter: a check, not a speed)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="feature-map sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=16, help="images per batch")
    ap.add_argument("--dtypes", default=None, help="comma-separated, e.g. bfloat16,float32 (default: both on CUDA)")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds per case")
    ap.add_argument("--out", default=None, help="folder for conv1x1.json and conv1x1.md")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="CPU: time with glibc keeping freed memory (as fasthg train does; fasthg.bench.malloc)")
    a = ap.parse_args(argv)
    if a.keep_freed_memory:
        from fasthg.bench import malloc

        malloc.keep_freed_memory()
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")] if a.dtypes else None
    rows = run(a.device, [int(v) for v in a.levels.split(",")], batch=a.batch, dtypes=dtypes, repeats=a.repeats,
               out_dir=a.out, backend=a.backend)
    print(table(rows))


if __name__ == "__main__":
    main()
