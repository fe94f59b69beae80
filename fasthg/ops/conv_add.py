"""conv_add(x, conv, residual) = conv(x) + residual: a residual block's last convolution and
its merge with the skip branch (and a stack's remap convolutions with the input they join).
conv is an nn.Conv2d or a fasthg.nn.Conv2d.

On the CPU the add runs in oneDNN's convolution epilogue (its binary post-op, which ATen
exposes as mkldnn._convolution_pointwise), while each output tile is in cache, instead of as
a pass over three tensors of its own; the sum is rounded once. The backward is the
convolution's (fasthg.ops.conv2d.backward: aten.convolution_backward, the weight gradient on
AMX where that runs), and the residual's gradient is grad_out itself.
Elsewhere, and with backend="eager", it is the composition: conv(x) + residual.
"""
import torch
from torch import nn

from fasthg.ops import _backend
from fasthg.ops.conv2d import backward_grads, compute_dtype, save_cast


def _is_plain(conv) -> bool:
    from fasthg.nn.conv2d import is_plain  # (fasthg.nn imports fasthg.ops)

    return is_plain(conv)


def reference(x: torch.Tensor, conv: nn.Conv2d, residual: torch.Tensor) -> torch.Tensor:
    return conv(x) + residual


def _find_pointwise():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return getattr(mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _find_fused_dtypes() -> tuple:
    """float32, and bf16 where oneDNN runs it natively (AVX-512 BW/VL/DQ or AVX-NE-CONVERT:
    on AVX2-only CPUs its bf16 convolutions refuse, and ATen's own path takes over)."""
    supported = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if supported is not None and supported() else (torch.float32,)


# Once, at import: torch.compile does not trace torch.backends' probes (fullgraph would break).
_POINTWISE = _find_pointwise()
_FUSED_DTYPES = _find_fused_dtypes()


def fuses(x: torch.Tensor, conv: nn.Module, residual: torch.Tensor, backend: str = "auto") -> bool:
    """Whether conv_add runs fused: a CPU nn.Conv2d with zero padding given as numbers, x and
    residual channels_last, residual shaped like the output and in the dtype the convolution
    computes in (float32, or bf16 where oneDNN has it natively), oneDNN present, and a backend
    other than eager."""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    if backend == "eager" or not _is_plain(conv) or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str) or x.device.type != "cpu" or x.dim() != 4 or _POINTWISE is None:
        return False
    dtype = compute_dtype(x)
    if dtype not in _FUSED_DTYPES or residual.dtype != dtype or residual.dim() != 4:
        return False
    cl = torch.channels_last
    if not (x.is_contiguous(memory_format=cl) and residual.is_contiguous(memory_format=cl)):
        return False
    n, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out = (n, conv.out_channels, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    return tuple(residual.shape) == out and x.shape[1] == conv.in_channels


class _ConvAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, dtype, stride, padding, dilation, groups):
        w, b = save_cast(ctx, x, weight, bias, dtype, stride, padding, dilation, groups)
        return _POINTWISE.binary(x, residual, w, b, padding, stride, dilation, groups, "add", None, None, [], None)

    @staticmethod
    def backward(ctx, grad):
        gx, gw, gb = backward_grads(ctx, grad)
        return gx, gw, gb, grad, None, None, None, None, None


def conv_add(x: torch.Tensor, conv: nn.Module, residual: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """conv(x) + residual, the add in the convolution's epilogue where `fuses` says so (the
    CPU, channels_last, float32 or bf16 autocast); elsewhere the composition."""
    if not fuses(x, conv, residual, backend):
        return reference(x, conv, residual)
    dtype = compute_dtype(x)
    return _ConvAdd.apply(x.to(dtype), conv.weight, conv.bias, residual, dtype, list(conv.stride),
                          list(conv.padding), list(conv.dilation), conv.groups)
