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
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from fasthg import ops
from fasthg.bench import traffic
from fasthg.bench.chart import speedup_figure
from fasthg.bench.harness import (Rotation, add_run_args, dtype_name, interleaved_samples, last_level_cache_bytes,
                                  markdown_table, medians_and_spreads, run_args_dtypes,
                                  write_results)
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
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_description()
        write_results(out_dir, "conv1x1", name, rows, table(rows), chart)
    return rows


def _shape(r) -> str:
    return f"{r['cin']}->{r['cout']}\n{r['level']}x{r['level']}"


def chart(rows, device_name: str, path: str) -> None:
    """conv1x1.png: the unit's speedup over the unfused composition, a panel per mode, the
    shapes along x, a bar per dtype."""
    speedup_figure([r for r in rows if r["backend"] != "unfused"], lambda r: r["mode"],
                   lambda r: f"{r['dtype']} {r['backend']}", _shape, "speedup over BN-ReLU + conv (x)",
                   lambda mode, these: f"bn_relu_conv1x1 {mode}, batch {these[0]['batch']}, channels_last",
                   f"fused BN-ReLU-conv1x1 unit on {device_name}", path)


def table(rows) -> str:
    which = next((r["backend"] for r in rows if r["backend"] != "unfused"), "fused")
    conv = "oneDNN" if which == "native" else "cuDNN"
    return markdown_table(
        f"bn_relu_conv1x1: {which} (fused, x's statistics included) vs fused BN-ReLU + {conv} conv + statistics "
        f"pass (unfused), channels_last; speedup = unfused / {which}, same run",
        ["dtype", "shape", "Cin->Cout", "mode", "backend", "median ms", "spread", "speedup", "GB/s"],
        [[r["dtype"], f"{r['batch']}x{r['level']}x{r['level']}", f"{r['cin']}->{r['cout']}", r["mode"], r["backend"],
          f"{r['median_ms']:.3f}", f"{r['spread']:.0%}", f"{r['speedup']:.2f}x", f"{r['gb_s']:.0f}"] for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fasthg.bench.conv1x1", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--backend", default="auto", choices=unit.BACKENDS,
                    help="the unit's backend (auto: native on the CPU, Triton on CUDA; triton on the CPU is the "
                         "interpreter: a check, not a speed)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="feature-map sizes, comma-separated")
    add_run_args(ap, 16, "conv1x1.json, conv1x1.md and conv1x1.png", "default: both on CUDA")
    a = ap.parse_args(argv)
    dtypes = run_args_dtypes(a)
    rows = run(a.device, [int(v) for v in a.levels.split(",")], batch=a.batch, dtypes=dtypes, repeats=a.repeats,
               out_dir=a.out, backend=a.backend)
    print(table(rows))


if __name__ == "__main__":
    main()
