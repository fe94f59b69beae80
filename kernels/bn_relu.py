"""Triton kernels of the fused BatchNorm+ReLU ops, the same four passes as csrc/cpu/bn_relu.cpp:
per-channel statistics, normalise+clamp, and the backward's reduction and elementwise pass
(ReLU mask recomputed from x). Plain functions over tensors (NCHW or channels_last); the
math runs in float32 (float64 for float64 x), like the statistics and parameters; the
per-channel sums accumulate in float64, as ATen's CPU BatchNorm does: BN backward subtracts
nearly equal terms, and float32 sums cost up to 1e-2 relative error in a stacked BN's grad_x.
Reductions run on a (channel tiles, splits) grid writing float64 partials that torch adds
up, so that few channels with large H*W still fill the GPU."""
import torch
import triton
import triton.language as tl

from fasthg.ops.layout import memory_format_of
from fasthg.kernels._index import needs_int64, program_index

BLOCK = 1024


@triton.jit
def _channel_offsets(idx, c, C, HW, CHANNELS_LAST: tl.constexpr):
    """Offsets of elements idx (0..N*HW) of channel c."""
    if CHANNELS_LAST:
        return idx * C + c
    return (idx // HW * C + c) * HW + idx % HW


@triton.jit
def _channel_of(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % C
    return offs // HW % C


@triton.jit
def _split_range(M, SPLITS, INT64: tl.constexpr, ROWS: tl.constexpr):
    """This program's [start, end) of the M = N*H*W rows of its channels (ROWS-aligned)."""
    per = tl.cdiv(tl.cdiv(M, SPLITS), ROWS) * ROWS
    start = program_index(1, INT64) * per
    return start, tl.minimum(start + per, M)


@triton.jit
def _tile_channels(C, INT64: tl.constexpr, COLS: tl.constexpr):
    """The COLS channels of this program's tile, and which of them exist."""
    c = program_index(0, INT64) * COLS + tl.arange(0, COLS)
    return c, c < C


@triton.jit
def _tile(first, end, c, cmask, C, HW, CHANNELS_LAST: tl.constexpr, ROWS: tl.constexpr):
    """Offsets and mask of the tile of rows first..first+ROWS (below end) of channels c."""
    idx = first + tl.arange(0, ROWS)
    mask = (idx < end)[:, None] & cmask[None, :]
    return _channel_offsets(idx[:, None], c[None, :], C, HW, CHANNELS_LAST), mask


@triton.jit
def _stats_kernel(x_ptr, s1_ptr, s2_ptr, M, C, HW, SPLITS, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    """Partial sums of d = x - pivot and d*d, pivot = the channel's first element (shared by
    every split, so partials add up; large offsets cost no precision)."""
    c, cmask = _tile_channels(C, INT64, COLS)
    pivot = tl.load(x_ptr + _channel_offsets(0, c, C, HW, CHANNELS_LAST), mask=cmask, other=0.0).to(tl.float64)
    start, end = _split_range(M, SPLITS, INT64, ROWS)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float64)
    acc2 = tl.zeros([ROWS, COLS], dtype=tl.float64)
    for first in range(start, end, ROWS):
        offs, mask = _tile(first, end, c, cmask, C, HW, CHANNELS_LAST, ROWS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        d = tl.where(mask, x - pivot[None, :], 0.0)
        acc += d
        acc2 += d * d
    out = program_index(1, INT64) * C + c
    tl.store(s1_ptr + out, tl.sum(acc, axis=0), mask=cmask)
    tl.store(s2_ptr + out, tl.sum(acc2, axis=0), mask=cmask)


@triton.jit
def _relu_passes(y):
    """Where relu's backward passes the gradient: not y <= 0, so a NaN passes (as
    threshold_backward does); csrc/bn_relu.h's bn_relu_masked_grad."""
    return (y > 0) | (y != y)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, total, C, HW,
                    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = _channel_of(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    scale = tl.load(invstd_ptr + c, mask=mask, other=0.0) * tl.load(w_ptr + c, mask=mask, other=0.0)
    y = (x - mean) * scale + tl.load(b_ptr + c, mask=mask, other=0.0)
    tl.store(y_ptr + offs, tl.where(y < 0, 0.0, y).to(y_ptr.dtype.element_ty), mask=mask)  # a NaN stays NaN, as in torch.relu


@triton.jit
def _backward_reduce_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gx_ptr,
                            M, C, HW, SPLITS, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
    c, cmask = _tile_channels(C, INT64, COLS)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)[None, :]
    scale = invstd * tl.load(w_ptr + c, mask=cmask, other=0.0)[None, :]
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0)[None, :]
    start, end = _split_range(M, SPLITS, INT64, ROWS)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float64)
    accx = tl.zeros([ROWS, COLS], dtype=tl.float64)
    for first in range(start, end, ROWS):
        offs, mask = _tile(first, end, c, cmask, C, HW, CHANNELS_LAST, ROWS)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.where(mask & _relu_passes((x - mean) * scale + bias), dy, 0.0)
        acc += g.to(tl.float64)
        accx += (g * ((x - mean) * invstd)).to(tl.float64)
    out = program_index(1, INT64) * C + c
    tl.store(sum_g_ptr + out, tl.sum(acc, axis=0), mask=cmask)
    tl.store(sum_gx_ptr + out, tl.sum(accx, axis=0), mask=cmask)


@triton.jit
def _backward_elemt_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, mean_g_ptr,
                           mean_gx_ptr, total, C, HW, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                           INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = _channel_of(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=mask, other=0.0)
    w = tl.load(w_ptr + c, mask=mask, other=0.0)
    g = tl.where(_relu_passes((x - mean) * (invstd * w) + tl.load(b_ptr + c, mask=mask, other=0.0)), dy, 0.0)
    xhat = (x - mean) * invstd
    dx = w * invstd * (g - tl.load(mean_g_ptr + c, mask=mask, other=0.0)
                       - xhat * tl.load(mean_gx_ptr + c, mask=mask, other=0.0))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _prep(x):
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    n, c, h, w = x.shape
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    pdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x, fmt, n * h * w, c, h * w, fmt == torch.channels_last, acc, pdtype


def _tiles(C: int, M: int, channels_last: bool, device):
    """The reductions' tile (ROWS x COLS: one channel's rows for NCHW; for channels_last 32
    adjacent channels, so that a row's loads are contiguous, not one element at stride C)
    and grid: splits per tile column for about 4 programs per SM, none under one tile."""
    cols = 32 if channels_last else 1
    rows = BLOCK // cols
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    columns = triton.cdiv(C, cols)
    splits = max(1, min(triton.cdiv(target, columns), triton.cdiv(M, rows)))
    return rows, cols, (columns, splits)


def _partials(C, splits, device):
    return (torch.empty((splits, C), dtype=torch.float64, device=device),
            torch.empty((splits, C), dtype=torch.float64, device=device))


def stats(x: torch.Tensor):
    """Per-channel mean and biased variance (float32, or float64 for float64 x)."""
    x, _, M, C, HW, cl, _, pdtype = _prep(x)
    rows, cols, grid = _tiles(C, M, cl, x.device)
    s1, s2 = _partials(C, grid[1], x.device)
    _stats_kernel[grid](x, s1, s2, M, C, HW, grid[1], CHANNELS_LAST=cl, INT64=needs_int64(x), ROWS=rows, COLS=cols)
    pivot = x[0, :, 0, 0].to(torch.float64)
    d = s1.sum(0) / M
    var = (s2.sum(0) / M - d * d).clamp_min_(0)
    return (pivot + d).to(pdtype), var.to(pdtype)


def forward(x, mean, invstd, weight, bias, out=None):
    """out: written instead of a new tensor (like x, dense in x's memory format, apart from x)."""
    x, fmt, _, C, HW, cl, acc, _ = _prep(x)
    y = torch.empty_like(x, memory_format=fmt) if out is None else out
    total = x.numel()
    _forward_kernel[(triton.cdiv(total, BLOCK),)](x, y, mean, invstd, weight, bias, total, C, HW,
                                                  CHANNELS_LAST=cl, ACC=acc, INT64=needs_int64(x), BLOCK=BLOCK)
    return y


def backward_reduce(grad_out, x, mean, invstd, weight, bias):
    x, fmt, M, C, HW, cl, acc, pdtype = _prep(x)
    dy = grad_out.contiguous(memory_format=fmt)
    rows, cols, grid = _tiles(C, M, cl, x.device)
    sum_g, sum_gx = _partials(C, grid[1], x.device)
    _backward_reduce_kernel[grid](dy, x, mean, invstd, weight, bias, sum_g, sum_gx, M, C, HW, grid[1],
                                  CHANNELS_LAST=cl, ACC=acc, INT64=needs_int64(x), ROWS=rows, COLS=cols)
    return sum_g.sum(0).to(pdtype), sum_gx.sum(0).to(pdtype)


def backward_elemt(grad_out, x, mean, invstd, weight, bias, mean_g, mean_gx):
    x, fmt, _, C, HW, cl, acc, _ = _prep(x)
    dy = grad_out.contiguous(memory_format=fmt)
    dx = torch.empty_like(x, memory_format=fmt)
    total = x.numel()
    _backward_elemt_kernel[(triton.cdiv(total, BLOCK),)](dy, x, dx, mean, invstd, weight, bias, mean_g, mean_gx,
                                                         total, C, HW, CHANNELS_LAST=cl, ACC=acc,
                                                         INT64=needs_int64(x), BLOCK=BLOCK)
    return dx


def compile_variants(dt: str, channels_last: bool, int64: bool):
    """(kernel, pointer argument -> element type, constexprs) of every kernel variant the op
    launches for activations of Triton type `dt`: tests/triton_compile_all.py compiles them
    for sm_90 ahead of time."""
    acc = tl.float64 if dt == "fp64" else tl.float32
    param = "fp64" if dt == "fp64" else "fp32"
    rows, cols, _ = _tiles(256, 4096, channels_last, torch.device("cpu"))  # the tile the kernels get
    params = {k: param for k in ("mean_ptr", "invstd_ptr", "w_ptr", "b_ptr", "mean_g_ptr", "mean_gx_ptr")}
    act = {k: dt for k in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")}
    sums = {k: "fp64" for k in ("s1_ptr", "s2_ptr", "sum_g_ptr", "sum_gx_ptr")}
    base = dict(CHANNELS_LAST=channels_last, INT64=int64)
    yield _stats_kernel, {**act, **sums}, dict(base, ROWS=rows, COLS=cols)
    yield _backward_reduce_kernel, {**act, **params, **sums}, dict(base, ACC=acc, ROWS=rows, COLS=cols)
    for k in (_forward_kernel, _backward_elemt_kernel):
        yield k, {**act, **params}, dict(base, ACC=acc, BLOCK=BLOCK)

