"""Triton kernels of upsample_add: out = skip + nearest_upsample(low), and grad_low as the
block sum of grad_out. Plain functions over tensors (NCHW or channels_last, any float dtype);
autograd and op registration live in fasthg/ops/upsample_add.py."""
import torch
import triton
import triton.language as tl

from fasthg.ops.layout import memory_format_of
from fasthg.kernels._index import coords, needs_int64, offset, program_index

BLOCK = 1024


def nearest_src_map(n_in: int, n_out: int, device) -> torch.Tensor:
    """Source index of every output index along one axis: ATen's float32 formula, so the
    result matches F.interpolate(mode="nearest") exactly."""
    dst = torch.arange(n_out, device=device)
    if n_out == n_in:
        return dst
    if n_out == 2 * n_in:
        return dst // 2
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = torch.floor(dst.to(torch.float32) * scale.to(device)).to(torch.int64)
    return src.clamp_(max=n_in - 1)


def nearest_dst_begin(n_in: int, n_out: int, device) -> torch.Tensor:
    """begin[s] = first output index fed by source s; begin[n_in] = n_out."""
    src = nearest_src_map(n_in, n_out, device)
    return torch.searchsorted(src, torch.arange(n_in + 1, device=device))


@triton.jit
def _forward_kernel(low_ptr, skip_ptr, out_ptr, src_h_ptr, src_w_ptr, total, C, Hi, Wi, Ho, Wo,
                    CHANNELS_LAST: tl.constexpr, TWICE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, h, w = coords(offs, C, Ho, Wo, CHANNELS_LAST)
    if TWICE:
        sh = h // 2
        sw = w // 2
    else:
        sh = tl.load(src_h_ptr + h, mask=mask, other=0)
        sw = tl.load(src_w_ptr + w, mask=mask, other=0)
    skip = tl.load(skip_ptr + offs, mask=mask)
    low = tl.load(low_ptr + offset(n, c, sh, sw, C, Hi, Wi, CHANNELS_LAST), mask=mask)
    # Add in float32 and round once, as eager does.
    out = skip.to(tl.float32) + low.to(tl.float32) if skip.dtype != tl.float64 else skip + low
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(grad_ptr, grad_low_ptr, begin_h_ptr, begin_w_ptr, total, C, Hi, Wi, Ho, Wo,
                     KH: tl.constexpr, KW: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     TWICE: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = program_index(0, INT64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, i, j = coords(offs, C, Hi, Wi, CHANNELS_LAST)
    if TWICE:
        h0 = 2 * i
        h1 = h0 + 2
        w0 = 2 * j
        w1 = w0 + 2
    else:
        h0 = tl.load(begin_h_ptr + i, mask=mask, other=0)
        h1 = tl.load(begin_h_ptr + i + 1, mask=mask, other=0)
        w0 = tl.load(begin_w_ptr + j, mask=mask, other=0)
        w1 = tl.load(begin_w_ptr + j + 1, mask=mask, other=0)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for dh in tl.static_range(KH):
        for dw in tl.static_range(KW):
            y = h0 + dh
            x = w0 + dw
            m = mask & (y < h1) & (x < w1)
            g = tl.load(grad_ptr + offset(n, c, y, x, C, Ho, Wo, CHANNELS_LAST), mask=m, other=0.0)
            acc += g.to(ACC)
    tl.store(grad_low_ptr + offs, acc.to(grad_low_ptr.dtype.element_ty), mask=mask)


def upsample_add(low: torch.Tensor, skip: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """skip + nearest_upsample(low); the output has skip's memory format. inplace: written into
    skip, which must then be dense (each element is loaded before it is stored, by one program)."""
    fmt = memory_format_of(skip)
    if inplace and not skip.is_contiguous(memory_format=fmt):
        raise ValueError(f"upsample_add: in place, `skip` must be dense (NCHW or channels_last), got strides "
                         f"{skip.stride()}")
    skip = skip.contiguous(memory_format=fmt)
    low = low.contiguous(memory_format=fmt)
    out = skip if inplace else torch.empty_like(skip, memory_format=fmt)
    _, C, Ho, Wo = skip.shape
    Hi, Wi = low.shape[-2:]
    twice = Ho == 2 * Hi and Wo == 2 * Wi
    if twice:
        src_h = src_w = skip  # unused by the kernel
    else:
        src_h = nearest_src_map(Hi, Ho, skip.device)
        src_w = nearest_src_map(Wi, Wo, skip.device)
    total = out.numel()
    _forward_kernel[(triton.cdiv(total, BLOCK),)](
        low, skip, out, src_h, src_w, total, C, Hi, Wi, Ho, Wo,
        CHANNELS_LAST=fmt == torch.channels_last, TWICE=twice, INT64=needs_int64(skip), BLOCK=BLOCK)
    return out


def upsample_add_backward(grad_out: torch.Tensor, low_h: int, low_w: int) -> torch.Tensor:
    """Gradient of `low`: each low element sums the grad_out elements it was copied to."""
    fmt = memory_format_of(grad_out)
    grad_out = grad_out.contiguous(memory_format=fmt)
    N, C, Ho, Wo = grad_out.shape
    grad_low = torch.empty((N, C, low_h, low_w), dtype=grad_out.dtype, device=grad_out.device,
                           memory_format=fmt)
    twice = Ho == 2 * low_h and Wo == 2 * low_w
    if twice:
        begin_h = begin_w = grad_out  # unused by the kernel
        kh = kw = 2
    else:
        begin_h = nearest_dst_begin(low_h, Ho, grad_out.device)
        begin_w = nearest_dst_begin(low_w, Wo, grad_out.device)
        kh = int((begin_h[1:] - begin_h[:-1]).max())
        kw = int((begin_w[1:] - begin_w[:-1]).max())
    acc = tl.float64 if grad_out.dtype == torch.float64 else tl.float32
    total = grad_low.numel()
    _backward_kernel[(triton.cdiv(total, BLOCK),)](
        grad_out, grad_low, begin_h, begin_w, total, C, low_h, low_w, Ho, Wo,
        KH=kh, KW=kw, CHANNELS_LAST=fmt == torch.channels_last, TWICE=twice, ACC=acc, INT64=needs_int64(grad_out),
        BLOCK=BLOCK)
    return grad_low


def compile_variants(dt: str, channels_last: bool, int64: bool):
    """(kernel, pointer argument -> element type, constexprs) of every kernel variant the op
    launches for activations of Triton type `dt`: tests/triton_compile_all.py compiles them
    for sm_90 ahead of time."""
    acc = tl.float64 if dt == "fp64" else tl.float32
    ptrs = {"low_ptr": dt, "skip_ptr": dt, "out_ptr": dt, "grad_ptr": dt, "grad_low_ptr": dt,
            "src_h_ptr": "i64", "src_w_ptr": "i64", "begin_h_ptr": "i64", "begin_w_ptr": "i64"}
    for twice in (True, False):
        ups = dict(CHANNELS_LAST=channels_last, INT64=int64, TWICE=twice, BLOCK=BLOCK)
        yield _forward_kernel, ptrs, ups
        yield _backward_kernel, ptrs, dict(ups, KH=2, KW=3, ACC=acc)

