"""Benchmark of the Triton BN-ReLU-conv1x1 unit (fasthg.ops.conv1x1) against what runs today:
the fused BN-ReLU (native, else eager) then cuDNN's (or oneDNN's) 1x1 convolution, then the
next BN's statistics pass; forward, and forward+backward (gradients of x, the BN's weight and
bias, the convolution's weight and bias). At the hourglass's residual-module shapes (256 -> 128
and 128 -> 256 channels), channels_last, timed round-robin with fasthg.bench.harness over
inputs rotated through twice the last-level cache, with each row's compulsory bytes
(fasthg.bench.traffic) and the GB/s they make.

    python -m fasthg.bench.conv1x1 --device cuda --out DIR   (benchmarks/gpu_check.sh runs it)

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
from fasthg.device import resolve as resolve_device
from fasthg.ops.conv1x1 import bn_relu_conv1x1

UNITS = traffic.UNITS
LEVELS = (64, 32, 16)


def _next_stats(y):
    """The next BN's statistics pass over y (the fused unit's epilogue does this)."""
    return torch.var_mean(y, dim=(0, 2, 3), correction=0)


def calls(n: int, cin: int, cout: int, hw: int, dtype, device, cache_bytes: int = 0) -> Dict[str, Dict[str, Callable]]:
    """{mode: {"unfused": fn, "triton": fn}} for one shape."""
    p = torch.float32 if dtype != torch.float64 else torch.float64

    def one_set():
        x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(n, cout, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        mean, var = (t.to(p) for t in torch.var_mean(x.to(p), dim=(0, 2, 3), correction=0)[::-1])
        return x, gy, mean, torch.rsqrt(var + 1e-5), x.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    bn_w = torch.rand(cin, device=device, dtype=p).add_(0.5).requires_grad_(True)
    bn_b = torch.randn(cin, device=device, dtype=p).requires_grad_(True)
    conv_w = (torch.randn(cout, cin, 1, 1, device=device, dtype=dtype) / cin ** 0.5).requires_grad_(True)
    conv_b = torch.randn(cout, device=device, dtype=dtype).requires_grad_(True)
    rm, rv = torch.zeros(cin, device=device, dtype=p), torch.ones(cin, device=device, dtype=p)
    bn_backend = "native" if "native" in ops.available(torch.device(device).type, "bn_relu") else "eager"

    def unfused(x):
        y = F.conv2d(ops.bn_relu(x, bn_w, bn_b, rm, rv, training=True, backend=bn_backend), conv_w, conv_b)
        return y, _next_stats(y.detach())

    def fused(x, mean, invstd):
        return bn_relu_conv1x1(x, mean, invstd, bn_w, bn_b, conv_w, conv_b, training=True, out_stats=True)

    def forward_of(which):
        def run():
            x, _, mean, invstd, _ = sets.next()
            with torch.no_grad():
                return unfused(x) if which == "unfused" else fused(x, mean, invstd)
        return run

    def fb_of(which):
        def run():
            _, gy, mean, invstd, xg = sets.next()
            y = unfused(xg)[0] if which == "unfused" else fused(xg, mean, invstd)[0]
            return torch.autograd.grad(y, (xg, bn_w, bn_b, conv_w, conv_b), gy)
        return run

    return {mode: {b: make(b) for b in ("unfused", "triton")}
            for mode, make in (("forward", forward_of), ("forward+backward", fb_of))}


def run(device: str = "auto", levels=LEVELS, units=UNITS, batch: int = 16, dtypes=None, repeats: int = 20,
        warmup: int = 3, out_dir: str = None) -> List[dict]:
    dev = resolve_device(device)
    dtypes = dtypes or ([torch.bfloat16, torch.float32] if dev.type == "cuda" else [torch.float32])
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
                    for mode, fns in calls(batch, cin, cout, hw, dtype, dev, cache).items():
                        with torch.enable_grad():
                            med, spreads = medians_and_spreads(interleaved_samples(fns, dev, warmup, repeats))
                        for b in fns:
                            kind = "fused" if b == "triton" else "unfused"
                            byts = moved[f"{kind} forward"] + (moved[f"{kind} backward"] if mode != "forward" else 0)
                            rows.append({"op": "bn_relu_conv1x1", "dtype": dtype_name(dtype), "level": hw,
                                         "cin": cin, "cout": cout, "batch": batch, "mode": mode, "backend": b,
                                         "median_ms": med[b] * 1e3, "spread": spreads[b],
                                         "speedup": med["unfused"] / med[b], "bytes": byts,
                                         "gb_s": byts / med[b] / 1e9})
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "conv1x1.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "rows": rows}, f,
                      indent=1)
        with open(os.path.join(out_dir, "conv1x1.md"), "w") as f:
            f.write(table(rows) + "\n")
    return rows


def table(rows) -> str:
    lines = ["bn_relu_conv1x1: Triton (fused) vs fused BN-ReLU + cuDNN conv + statistics pass (unfused), "
             "channels_last; speedup = unfused / triton, same run",
             "| dtype | shape | Cin->Cout | mode | backend | median ms | spread | speedup | GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']}x{r['level']}x{r['level']} | {r['cin']}->{r['cout']} | {r['mode']} "
                     f"| {r['backend']} | {r['median_ms']:.3f} | {r['spread']:.0%} | {r['speedup']:.2f}x "
                     f"| {r['gb_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fasthg.bench.conv1x1", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cuda, cpu (the Triton interpreter: a check, not a speed) or auto")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="feature-map sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=16, help="images per batch")
    ap.add_argument("--dtypes", default=None, help="comma-separated, e.g. bfloat16,float32 (default: both on CUDA)")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds per case")
    ap.add_argument("--out", default=None, help="folder for conv1x1.json and conv1x1.md")
    a = ap.parse_args(argv)
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")] if a.dtypes else None
    rows = run(a.device, [int(v) for v in a.levels.split(",")], batch=a.batch, dtypes=dtypes, repeats=a.repeats,
               out_dir=a.out)
    print(table(rows))


if __name__ == "__main__":
    main()
