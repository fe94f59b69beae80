"""Benchmark of fasthg.ops.conv2d's CPU kernels against oneDNN's convolution (nn.Conv2d in
eager PyTorch), forward and forward+backward (gradients of x, the weight and the bias), at the
hourglass's convolutions (batch 4, channels_last): the 3x3 128 -> 128 at every map size and
the 64 -> 64 of the first residual at 128x128 (float32: Winograd's F(2x2, 3x3)), the 1x1s
that run outside the BN-ReLU-conv unit (float32: the backward on the unit's FMA kernel), and in bfloat16
on AMX CPUs the same shapes with fasthg's AMX backward. A row per shape says which kernel
fasthg.ops.conv2d routes it to ("onednn" where it keeps oneDNN's). Timed round-robin with
fasthg.bench.harness over inputs rotated through twice the last-level cache.

    python -m fasthg.bench.conv2d --keep-freed-memory --out DIR
"""
import argparse
import importlib
from typing import Callable, Dict, List

import torch
from torch import nn

from fasthg.bench.chart import speedup_figure
from fasthg.bench.harness import (Rotation, add_run_args, dtype_name, interleaved_samples, last_level_cache_bytes,
                                  markdown_table, medians_and_spreads, run_args_dtypes,
                                  write_results)
from fasthg.device import cpu_description
from fasthg.nn import Conv2d

conv2d_module = importlib.import_module("fasthg.ops.conv2d")  # (fasthg.ops.conv2d is the function)

# (cin, cout, kernel, map size)
SHAPES = [(128, 128, 3, 64), (128, 128, 3, 32), (128, 128, 3, 16), (128, 128, 3, 8), (64, 64, 3, 128),
          (128, 256, 1, 64), (256, 256, 1, 64), (64, 128, 1, 128)]


def route(x: torch.Tensor, conv: nn.Conv2d, dtype) -> str:
    """Which kernel fasthg.ops.conv2d runs this convolution's training on."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
        if not conv2d_module.fuses(x, conv):
            return "onednn"
    w = conv.weight.to(dtype)
    geo = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv2d_module.runs_winograd(x.to(dtype), w, *geo):
        return "winograd"
    return "fma" if dtype == torch.float32 else "amx"


def calls(n: int, cin: int, cout: int, k: int, hw: int, dtype, cache_bytes: int) -> Dict[str, Dict[str, Callable]]:
    """{mode: {"onednn": fn, "fasthg": fn}} for one shape; float32 parameters (under bf16
    autocast where dtype is bf16), as training keeps them."""
    torch.manual_seed(0)
    cl = torch.channels_last
    ours = Conv2d(cin, cout, k, padding=k // 2).to(memory_format=cl)
    plain = nn.Conv2d(cin, cout, k, padding=k // 2).to(memory_format=cl)
    plain.load_state_dict(ours.state_dict())

    def one_set():
        x = torch.randn(n, cin, hw, hw, dtype=dtype).contiguous(memory_format=cl)
        gy = torch.randn(n, cout, hw, hw, dtype=dtype).contiguous(memory_format=cl)
        return x, gy, x.clone().requires_grad_(True)

    sets = Rotation(one_set, cache_bytes)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def forward_of(conv):
        def run():
            x, _, xg = sets.next()
            with torch.autocast(**autocast):
                return conv(xg)  # (gradients wanted: the training forward)
        return run

    def fb_of(conv):
        def run():
            _, gy, xg = sets.next()
            with torch.autocast(**autocast):
                y = conv(xg)
            return torch.autograd.grad(y, (xg, conv.weight, conv.bias), gy)
        return run

    return {mode: {"onednn": make(plain), "fasthg": make(ours)}
            for mode, make in (("forward", forward_of), ("forward+backward", fb_of))}


def run(shapes=SHAPES, batch: int = 4, dtypes=None, repeats: int = 20, warmup: int = 3,
        out_dir: str = None) -> List[dict]:
    dev = torch.device("cpu")
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if conv2d_module.amx_available() else [torch.float32])
    cache = last_level_cache_bytes(dev)
    rows = []
    for dtype in dtypes:
        for cin, cout, k, hw in shapes:
            x = torch.empty(batch, cin, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()
            which = route(x, nn.Conv2d(cin, cout, k, padding=k // 2), dtype)
            for mode, fns in calls(batch, cin, cout, k, hw, dtype, cache).items():
                with torch.enable_grad():
                    med, spreads = medians_and_spreads(interleaved_samples(fns, dev, warmup, repeats))
                rows.append({"dtype": dtype_name(dtype), "cin": cin, "cout": cout, "k": k, "level": hw,
                             "batch": batch, "mode": mode, "route": which,
                             "onednn_ms": med["onednn"] * 1e3, "fasthg_ms": med["fasthg"] * 1e3,
                             "spread": max(spreads.values()), "speedup": med["onednn"] / med["fasthg"]})
    if out_dir:
        name = cpu_description()
        write_results(out_dir, "conv2d", name, rows, table(rows), chart)
    return rows


def _label(r) -> str:
    return f"{r['k']}x{r['k']} {r['cin']}->{r['cout']}\n{r['level']}x{r['level']} {r['route']}"


def chart(rows, device_name: str, path: str) -> None:
    """conv2d.png: fasthg's speedup over oneDNN per shape, a panel per dtype, a bar per mode."""
    speedup_figure(rows, lambda r: r["dtype"], lambda r: r["mode"], _label, "speedup over oneDNN (x)",
                   lambda dt, these: f"fasthg.ops.conv2d, {dt}, batch {these[0]['batch']}, channels_last",
                   f"fasthg's convolution kernels vs oneDNN on {device_name}", path, stacked=True)


def table(rows) -> str:
    return markdown_table(
        "fasthg.ops.conv2d (route: the kernel it runs; onednn where it keeps oneDNN's) vs nn.Conv2d on oneDNN, "
        "channels_last; speedup = oneDNN / fasthg, same run",
        ["dtype", "shape", "conv", "route", "mode", "oneDNN ms", "fasthg ms", "spread", "speedup"],
        [[r["dtype"], f"{r['batch']}x{r['level']}x{r['level']}", f"{r['k']}x{r['k']} {r['cin']}->{r['cout']}",
          r["route"], r["mode"], f"{r['onednn_ms']:.3f}", f"{r['fasthg_ms']:.3f}", f"{r['spread']:.0%}",
          f"{r['speedup']:.2f}x"] for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fasthg.bench.conv2d", description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default=None, help="only these map sizes, comma-separated")
    add_run_args(ap, 4, "conv2d.json, conv2d.md and conv2d.png", "default: float32, and bfloat16 on AMX CPUs")
    a = ap.parse_args(argv)
    dtypes = run_args_dtypes(a)
    shapes = SHAPES
    if a.levels:
        levels = {int(v) for v in a.levels.split(",")}
        shapes = [s for s in SHAPES if s[3] in levels]
    rows = run(shapes, batch=a.batch, dtypes=dtypes, repeats=a.repeats, out_dir=a.out)
    print(table(rows))


if __name__ == "__main__":
    main()
