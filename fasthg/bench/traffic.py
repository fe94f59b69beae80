"""The bytes the BN-ReLU-conv1x1 unit must move, fused (fasthg.ops.conv1x1, Triton) against
the unfused sequence, per hourglass level: the argument for part 3 of issue 22's GPU gain
until a GPU measures it, and the time those bytes take at a GPU's bandwidth.

Counted in tensors read or written once per kernel pass (compulsory traffic: caches assumed
to hold nothing between passes, which is so at the large levels: a 64x64x256 batch-16 bf16
activation is 32 MiB against the H200's 50-60 MiB L2, and several are live). P = N*H*W
pixels, x [P, Cin], y [P, Cout], elements of `itemsize` bytes; the weight [Cout, Cin] is
counted too (read once per GEMM pass, its gradient written once).

Unfused (today's fastest: the fused BN-ReLU, then cuDNN's convolution, then the next BN's
statistics pass), forward: statistics read x; normalise+ReLU read x, write a; the convolution
reads a, writes y; the next BN's statistics read y. Backward: the convolution's data gradient
reads dy, writes da; its weight gradient reads dy and a; its bias gradient reads dy; the
BN-ReLU backward's reduction reads da and x, its elementwise pass da and x and writes dx.

Fused forward: read x, write y (and per-tile statistics partials). Fused backward (training):
the data pass twice (reduce, then dx: grad_y @ W recomputed rather than g written and read
back), each reading dy and x, the second writing dx; the weight pass reads dy and x. Eval
backward runs the data pass once. The fused kernels' partials (float64 statistics per program
of up to 16 64-row tiles; float32 weight-gradient partials per pixel split) are counted in
`partials`.
"""
from typing import Dict, List

# H200 (SXM): the vendor's 4.8 TB/s is HBM3e's peak; a device-to-device copy measured 4.3 TB/s
# on these machines (/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04, bytes read +
# written). Kernels that mix two read streams and one write stream rarely reach a plain copy:
# 4.0 TB/s is the bound assumed here, about 93% of that copy.
H200_BYTES_PER_S = 4.0e12
# kernels/conv1x1.py's tile rows (BM) and the weight gradient's pixels per split on a GPU
# (MIN_SPLIT_ROWS); tests/test_traffic.py checks that they agree.
TILE_ROWS = 64
SPLIT_ROWS = 2048
H200_SMS = 132

LEVELS = (64, 32, 16, 8, 4)
# The residual module's two 1x1 convolutions at 256 features: BN1-ReLU-conv1 (256 -> 128) and
# BN3-ReLU-conv3 (128 -> 256).
UNITS = ((256, 128), (128, 256))


def _cdiv(a, b):
    return -(-a // b)


def tiles_per_program(row_tiles: int, column_tiles: int, sms: int = H200_SMS) -> int:
    """kernels/conv1x1.py's tiles_per_program (the same formula; a test checks them)."""
    return max(1, min(16, row_tiles * column_tiles // (2 * sms)))


def bn_relu_conv1x1_bytes(n: int, h: int, w: int, cin: int, cout: int, itemsize: int) -> Dict[str, float]:
    """Bytes moved by the unit: 'unfused forward', 'fused forward', 'unfused backward', 'fused
    backward' (training), 'fused eval backward', and 'fused forward partials' / 'fused backward
    partials' (included in the fused totals), plus kernel launches of each."""
    p = n * h * w
    x, y, wt = p * cin * itemsize, p * cout * itemsize, cin * cout * itemsize
    tiles = _cdiv(p, TILE_ROWS)
    # one float64 (sum, sum of squares) partial per program, written, then read by the finalize
    stats_parts = _cdiv(tiles, tiles_per_program(tiles, _cdiv(cout, 64))) * 2 * cout * 8 * 2
    grad_parts = _cdiv(tiles, tiles_per_program(tiles, _cdiv(cin, 64))) * 2 * cin * 8 * 2
    weight_tiles = _cdiv(cout, 64) * _cdiv(cin, 64)
    splits = max(1, min(_cdiv(4 * H200_SMS, weight_tiles), _cdiv(p, SPLIT_ROWS)))
    dw_parts = splits * (cin * cout + cout) * 4 * 2
    return {
        "unfused forward": x + (x + x) + (x + wt + y) + y,
        "fused forward": x + wt + y + stats_parts,
        "fused forward partials": stats_parts,
        "unfused backward": (y + wt + x) + (y + x + wt) + y + (x + x) + (x + x + x),
        "fused backward": 2 * (y + x + wt) + x + (y + x + wt) + grad_parts + dw_parts,
        "fused eval backward": (y + x + wt + x) + (y + x + wt) + grad_parts + dw_parts,
        "fused backward partials": grad_parts + dw_parts,
        # the native CPU unit (csrc/cpu/conv1x1.cpp), x's statistics pass included | one pass
        # over the tiles (grad_y, x; the masked gradient written), then BN-ReLU's elementwise
        # pass (on AMX a second walk over the tiles, in place: the same bytes)
        "native forward": x + (x + wt + y),
        "native backward": (y + x + wt + x) + (x + x + x),
        # stats, normalise, conv, next stats | conv dgrad, wgrad, bias grad, BN reduce, BN elemt
        "unfused launches": (4, 5),
        # forward, finalize | data reduce, finalize, data dx, weight, 2 finalizes (+2 tiny divisions)
        "fused launches": (2, 8),
    }


def rows(batch: int = 16, levels=LEVELS, units=UNITS, itemsizes=(2, 4),
         bytes_per_s: float = H200_BYTES_PER_S) -> List[dict]:
    """One row per (itemsize, level, unit): MB moved and the time bound at bytes_per_s."""
    out = []
    us = lambda n_bytes: n_bytes / bytes_per_s * 1e6  # noqa: E731
    for size in itemsizes:
        for hw in levels:
            for cin, cout in units:
                b = bn_relu_conv1x1_bytes(batch, hw, hw, cin, cout, size)
                fb_unfused = b["unfused forward"] + b["unfused backward"]
                fb_fused = b["fused forward"] + b["fused backward"]
                out.append({"dtype": {2: "bf16", 4: "fp32"}.get(size, f"{size} B"), "level": hw, "cin": cin,
                            "cout": cout, "fwd_unfused_mb": b["unfused forward"] / 1e6,
                            "fwd_fused_mb": b["fused forward"] / 1e6, "fb_unfused_mb": fb_unfused / 1e6,
                            "fb_fused_mb": fb_fused / 1e6,
                            "partials_mb": (b["fused forward partials"] + b["fused backward partials"]) / 1e6,
                            "fwd_ratio": b["unfused forward"] / b["fused forward"],
                            "fb_ratio": fb_unfused / fb_fused,
                            "fwd_us": (us(b["unfused forward"]), us(b["fused forward"])),
                            "fb_us": (us(fb_unfused), us(fb_fused))})
    return out


def table(batch: int = 16, levels=LEVELS, bytes_per_s: float = H200_BYTES_PER_S) -> str:
    """Markdown: the unit's bytes unfused vs fused per level, and the H200 time they bound."""
    lines = [f"BN-ReLU-conv1x1 unit, compulsory bytes (fasthg.bench.traffic), batch {batch}; time bound at "
             f"{bytes_per_s / 1e12:.1f} TB/s (H200, assumed; launches not counted: the fused unit launches 2 "
             "kernels forward and 8 backward, the unfused 4 and 5)",
             "| dtype | level | Cin->Cout | fwd MB unfused | fwd MB fused | fwd less | fwd us unfused/fused "
             "| fwd+bwd MB unfused | fwd+bwd MB fused | fwd+bwd less | fwd+bwd us unfused/fused | partials MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(batch, levels, bytes_per_s=bytes_per_s):
        lines.append(f"| {r['dtype']} | {r['level']}x{r['level']} | {r['cin']}->{r['cout']} "
                     f"| {r['fwd_unfused_mb']:.2f} | {r['fwd_fused_mb']:.2f} | {r['fwd_ratio']:.2f}x "
                     f"| {r['fwd_us'][0]:.1f} / {r['fwd_us'][1]:.1f} | {r['fb_unfused_mb']:.2f} "
                     f"| {r['fb_fused_mb']:.2f} | {r['fb_ratio']:.2f}x | {r['fb_us'][0]:.1f} / {r['fb_us'][1]:.1f} "
                     f"| {r['partials_mb']:.2f} |")
    return "\n".join(lines)
