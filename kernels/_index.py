"""Index width and coordinates of the Triton kernels (the twin of csrc/cuda/index.cuh).
Division by a runtime divisor, which an elementwise kernel does per element to find its
channel or coordinates, costs several times more in int64 than in int32 on the GPU, so
offsets are int32 unless a tensor is large. The limit is 2^30, not 2^31: masked-off lanes past the end still compute
their offsets (up to BLOCK rows of C channels beyond), and those must not wrap either."""
import triton
import triton.language as tl

INT32_LIMIT = 2 ** 30


def needs_int64(*tensors) -> bool:
    """Whether offsets into these tensors need int64 (the kernels' INT64 flag)."""
    return max(t.numel() for t in tensors) >= INT32_LIMIT


@triton.jit
def program_index(axis, INT64: tl.constexpr):
    """tl.program_id(axis), widened to int64 when INT64, so the offsets computed from it are."""
    pid = tl.program_id(axis)
    if INT64:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def coords(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) of linear indices into a dense [N, C, H, W] tensor in NCHW or NHWC order."""
    if CHANNELS_LAST:
        c = offs % C
        t = offs // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:
        w = offs % W
        t = offs // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
    return n, c, h, w


@triton.jit
def offset(n, c, h, w, C, H, W, CHANNELS_LAST: tl.constexpr):
    """coords' inverse."""
    if CHANNELS_LAST:
        return ((n * H + h) * W + w) * C + c
    return ((n * C + c) * H + h) * W + w
