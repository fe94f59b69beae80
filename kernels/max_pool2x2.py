"""Triton kernels of max_pool2x2 (nn.MaxPool2d(2, 2): 2x2 windows, stride 2, floor mode) and its
backward, which finds each window's maximum again from x instead of reading saved indices.
Plain functions over tensors (NCHW or channels_last, any float dtype); autograd and op
registration live in fasthg/ops/max_pool2x2.py."""
import torch
import triton
import triton.language as tl

from fasthg.ops.layout import memory_format_of
from fasthg.kernels._index import coords, needs_int64, offset, program_index

BLOCK = 1024


@triton.jit
def _taken(v, best):
    # ATen's test: a NaN is always taken (so the last NaN wins), otherwise only a strictly
    # greater value (so the first of equal maxima wins). 16-bit values compare as float32.
    if v.dtype != tl.float64:
        v = v.to(tl.float32)
        best = best.to(tl.float32)
    return (v > best) | (v != v)


@triton.jit
def _window(x_ptr, n, c, i, j, mask, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Window (i, j)'s maximum, unchanged, and its position k in scan order (0, 0), (0, 1),
    (1, 0), (1, 1)."""
    p = x_ptr + offset(n, c, 2 * i, 2 * j, C, H, W, CHANNELS_LAST)
    step_w = C if CHANNELS_LAST else 1
    step_h = W * step_w
    best = tl.load(p, mask=mask, other=0.0)
    k = tl.zeros(best.shape, dtype=tl.int32)
    v = tl.load(p + step_w, mask=mask, other=0.0)
    t = _taken(v, best)
    best = tl.where(t, v, best)
    k = tl.where(t, 1, k)
    v = tl.load(p + step_h, mask=mask, other=0.0)
    t = _taken(v, best)
    best = tl.where(t, v, best)
    k = tl.where(t, 2, k)
    v = tl.load(p + step_h + step_w, mask=mask, other=0.0)
    t = _taken(v, best)
    best = tl.where(t, v, best)
    k = tl.where(t, 3, k)
    return best, k


@triton.jit
def _forward_kernel(x_ptr, y_ptr, total, C, H, W, Ho, Wo,
                    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, i, j = coords(offs, C, Ho, Wo, CHANNELS_LAST)
    best, _ = _window(x_ptr, n, c, i, j, mask, C, H, W, CHANNELS_LAST)
    tl.store(y_ptr + offs, best, mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, x_ptr, grad_x_ptr, total, C, H, W, Ho, Wo,
                     CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    # One lane per grad_x element, so every element is written once and the stores are
    # coalesced in both layouts: each finds its window's argmax (the window's other lanes
    # load the same elements, from cache) and keeps the window's grad only if it is the argmax.
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, h, w = coords(offs, C, H, W, CHANNELS_LAST)
    i = h // 2
    j = w // 2
    # An odd H or W leaves a last row or column in no window: its grad is 0.
    in_window = mask & (i < Ho) & (j < Wo)
    _, k = _window(x_ptr, n, c, i, j, in_window, C, H, W, CHANNELS_LAST)
    g = tl.load(grad_ptr + offset(n, c, i, j, C, Ho, Wo, CHANNELS_LAST), mask=in_window, other=0.0)
    mine = in_window & (k == 2 * (h % 2) + w % 2)
    tl.store(grad_x_ptr + offs, tl.where(mine, g, 0.0).to(grad_x_ptr.dtype.element_ty), mask=mask)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """nn.MaxPool2d(2, 2)(x): each window's first maximum (or its last NaN), in x's memory format."""
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    y = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    total = y.numel()
    _forward_kernel[(triton.cdiv(total, BLOCK),)](
        x, y, total, C, H, W, Ho, Wo, CHANNELS_LAST=fmt == torch.channels_last, INT64=needs_int64(x),
        BLOCK=BLOCK)
    return y


def max_pool2x2_backward(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gradient of x: grad_out at each window's maximum (the element max_pool2x2 picked), 0
    elsewhere; x's shape, dtype and memory format."""
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    grad_out = grad_out.contiguous(memory_format=fmt)
    N, C, H, W = x.shape
    grad_x = torch.empty_like(x, memory_format=fmt)
    total = grad_x.numel()
    _backward_kernel[(triton.cdiv(total, BLOCK),)](
        grad_out, x, grad_x, total, C, H, W, H // 2, W // 2, CHANNELS_LAST=fmt == torch.channels_last,
        INT64=needs_int64(x), BLOCK=BLOCK)
    return grad_x


def compile_variants(dt: str, channels_last: bool, int64: bool):
    """(kernel, pointer argument -> element type, constexprs) of every kernel variant the op
    launches for activations of Triton type `dt`: tests/triton_compile_all.py compiles them
    for sm_90 ahead of time."""
    ptrs = {"x_ptr": dt, "y_ptr": dt, "grad_ptr": dt, "grad_x_ptr": dt}
    consts = dict(CHANNELS_LAST=channels_last, INT64=int64, BLOCK=BLOCK)
    yield _forward_kernel, ptrs, consts
    yield _backward_kernel, ptrs, consts
