"""Triton kernels of the fused BatchNorm+add+ReLU ops (a residual block's end, relu(bn(x) +
residual)), the passes of csrc/cpu/bn_add_relu.cpp: normalise+add+clamp, then the backward's
reduction and elementwise pass. Statistics, tiling, index width and precision are bn_relu's
(kernels/bn_relu.py): math in float32 (float64 for float64 x), per-channel sums in float64.
The ReLU mask depends on the residual, so the backward masks with the saved output y, and the
reduction writes the masked gradient g (which is grad_residual too) for the elementwise pass."""
import torch
import triton
import triton.language as tl

from fasthg.kernels._index import needs_int64, program_index
from fasthg.kernels.bn_relu import (BLOCK, _channel_of, _partials, _prep, _split_range, _tile, _tile_channels,
                                    _tiles)


@triton.jit
def _forward_kernel(x_ptr, r_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, total, C, HW,
                    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = _channel_of(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    scale = tl.load(invstd_ptr + c, mask=mask, other=0.0) * tl.load(w_ptr + c, mask=mask, other=0.0)
    # The residual added in ACC and the sum rounded once, in csrc/bn_add_relu.h's order.
    y = (x - mean) * scale + tl.load(b_ptr + c, mask=mask, other=0.0) + r
    # y < 0 rather than a maximum, so that a NaN stays NaN, as in torch.relu.
    tl.store(y_ptr + offs, tl.where(y < 0, 0.0, y).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(dy_ptr, y_ptr, x_ptr, g_ptr, mean_ptr, invstd_ptr, sum_g_ptr, sum_gx_ptr,
                            M, C, HW, SPLITS, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
    c, cmask = _tile_channels(C, INT64, COLS)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)[None, :]
    start, end = _split_range(M, SPLITS, INT64, ROWS)
    acc = tl.zeros([ROWS, COLS], dtype=tl.float64)
    accx = tl.zeros([ROWS, COLS], dtype=tl.float64)
    for first in range(start, end, ROWS):
        offs, mask = _tile(first, end, c, cmask, C, HW, CHANNELS_LAST, ROWS)
        # Masked-off lanes load y = 0, so their g is 0 and adds nothing to the sums.
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.where(y <= 0, 0.0, dy)  # relu's backward: a NaN y passes dy
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc += g.to(tl.float64)
        accx += (g * ((x - mean) * invstd)).to(tl.float64)
    out = program_index(1, INT64) * C + c
    tl.store(sum_g_ptr + out, tl.sum(acc, axis=0), mask=cmask)
    tl.store(sum_gx_ptr + out, tl.sum(accx, axis=0), mask=cmask)


@triton.jit
def _backward_elemt_kernel(g_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, mean_g_ptr, mean_gx_ptr,
                           total, C, HW, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                           INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = _channel_of(offs, C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=mask, other=0.0)
    w = tl.load(w_ptr + c, mask=mask, other=0.0)
    xhat = (x - mean) * invstd
    dx = w * invstd * (g - tl.load(mean_g_ptr + c, mask=mask, other=0.0)
                       - xhat * tl.load(mean_gx_ptr + c, mask=mask, other=0.0))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def forward(x, residual, mean, invstd, weight, bias, out=None):
    """y = relu(bn(x) + residual). out: written instead of a new tensor (like x, dense in x's
    memory format); it may be residual itself (each element is read before it is written, by
    the same program) but not x, which the backward needs."""
    x, fmt, _, C, HW, cl, acc, _ = _prep(x)
    r = residual.contiguous(memory_format=fmt)
    y = torch.empty_like(x, memory_format=fmt) if out is None else out
    total = x.numel()
    _forward_kernel[(triton.cdiv(total, BLOCK),)](x, r, y, mean, invstd, weight, bias, total, C, HW,
                                                  CHANNELS_LAST=cl, ACC=acc, INT64=needs_int64(x), BLOCK=BLOCK)
    return y


def backward_reduce(grad_out, y, x, mean, invstd):
    """(g, sum of g, sum of g * xhat per channel): g = grad_out masked by relu's backward on y,
    like x (its dtype and memory format), written in the same pass as the sums."""
    x, fmt, M, C, HW, cl, acc, pdtype = _prep(x)
    dy = grad_out.contiguous(memory_format=fmt)
    y = y.contiguous(memory_format=fmt)
    g = torch.empty_like(x, memory_format=fmt)
    rows, cols, grid = _tiles(C, M, cl, x.device)
    sum_g, sum_gx = _partials(C, grid[1], x.device)
    _backward_reduce_kernel[grid](dy, y, x, g, mean, invstd, sum_g, sum_gx, M, C, HW, grid[1],
                                  CHANNELS_LAST=cl, ACC=acc, INT64=needs_int64(x), ROWS=rows, COLS=cols)
    return g, sum_g.sum(0).to(pdtype), sum_gx.sum(0).to(pdtype)


def backward_elemt(g, x, mean, invstd, weight, mean_g, mean_g_xhat):
    """grad_x of the BN from g (backward_reduce's) and the channel means of g and g * xhat."""
    x, fmt, _, C, HW, cl, acc, _ = _prep(x)
    g = g.contiguous(memory_format=fmt)
    dx = torch.empty_like(x, memory_format=fmt)
    total = x.numel()
    _backward_elemt_kernel[(triton.cdiv(total, BLOCK),)](g, x, dx, mean, invstd, weight, mean_g, mean_g_xhat,
                                                         total, C, HW, CHANNELS_LAST=cl, ACC=acc,
                                                         INT64=needs_int64(x), BLOCK=BLOCK)
    return dx


def compile_variants(dt: str, channels_last: bool, int64: bool):
    """(kernel, pointer argument -> element type, constexprs) of every kernel variant the op
    launches for activations of Triton type `dt`: tests/triton_compile_all.py compiles them
    for sm_90 ahead of time. The statistics kernel is bn_relu's, compiled in its list."""
    acc = tl.float64 if dt == "fp64" else tl.float32
    param = "fp64" if dt == "fp64" else "fp32"
    rows, cols, _ = _tiles(256, 4096, channels_last, torch.device("cpu"))  # the tile the kernels get
    params = {k: param for k in ("mean_ptr", "invstd_ptr", "w_ptr", "b_ptr", "mean_g_ptr", "mean_gx_ptr")}
    act = {k: dt for k in ("x_ptr", "r_ptr", "y_ptr", "dy_ptr", "g_ptr", "dx_ptr")}
    sums = {k: "fp64" for k in ("sum_g_ptr", "sum_gx_ptr")}
    base = dict(CHANNELS_LAST=channels_last, INT64=int64, ACC=acc)
    yield _backward_reduce_kernel, {**act, **params, **sums}, dict(base, ROWS=rows, COLS=cols)
    for k in (_forward_kernel, _backward_elemt_kernel):
        yield k, {**act, **params}, dict(base, BLOCK=BLOCK)
