"""conv2d(x, conv): the convolution on fasthg's CPU kernels where they pay, for training:

- bfloat16 on AMX CPUs (fasthg::conv2d_backward, csrc/cpu/conv2d.cpp): the backward of a
  stride-1 convolution with an odd square kernel, zero padding k // 2, no dilation, one group,
  even channel counts, channels_last input (the hourglass's 1x1 and 3x3 convolutions). There
  oneDNN's bf16 weight gradient takes 2-3x its own forward; fasthg's computes the weight and
  bias gradients, and for 1x1 convolutions the input gradient in the same pass over the output
  gradient. The forward (and a 3x3 input gradient) stay oneDNN's.
- float32 1x1 convolutions on large maps, on CPUs with AVX2 or AVX-512: the backward on
  fasthg::conv2d_backward too, the BN-ReLU-conv1x1 unit's float kernel without its BN-ReLU.
- float32 3x3 convolutions (stride 1, padding 1, one group) on CPUs with AVX2 or AVX-512, large
  enough maps (fasthg::conv3x3_winograd, csrc/cpu/conv3x3_winograd.cpp): forward, input and
  weight gradients by Winograd's F(2x2, 3x3), 16 multiplies per 2x2 output tile in place of 36.

Without gradients (inference) a float32 3x3 runs the Winograd forward where training would.
Everywhere else, and with backend="eager", it is the module's own forward.

`forward` and `backward` are the same choices for the other fasthg ops that run a
convolution (conv_add's backward, the recomputing BN-ReLU-conv unit).
"""
import torch
from torch import nn
from torch._prims_common import suggest_memory_format

from fasthg.ops import _backend, _ext


def _gemm_kernel(dtype, op: str) -> str:
    ops = getattr(torch.ops, "fasthg", None)
    if _ext.LOAD_ERROR is not None or not hasattr(ops, op):
        return "none"
    return torch.ops.fasthg.cpu_gemm_kernel(dtype)


# Once, at import: torch.compile traces through amx_available and fma_available.
_AMX = _gemm_kernel(torch.bfloat16, "conv2d_backward") == "amx"
_FMA = _gemm_kernel(torch.float32, "conv3x3_winograd") in ("avx512", "avx2")


def amx_available() -> bool:
    """Whether fasthg's extension is built and runs bf16 GEMMs on AMX here (csrc/cpu/brgemm_bf16.h)."""
    return _AMX


_MIN_PIXELS = 2048
_PIXELS_PER_WEIGHT = 0.1
# cout * cin of the weights (per kernel size) that fasthg's backward took at every map size
# measured: the hourglass's 1x1s (up to 256x256) and 3x3s (128x128) down to 4x4 maps.
_SMALL_WEIGHTS = {1: 256 * 256, 3: 128 * 128}


def fma_available() -> bool:
    """Whether fasthg's extension is built and its float32 GEMM kernel runs AVX2 or AVX-512 here
    (csrc/cpu/gemm_panels.h): the condition of the float32 routes (Winograd 3x3, 1x1 backward)."""
    return _FMA


# Pixels (batch x height x width) per weight element (cout x cin) from which the Winograd
# convolution ran faster than oneDNN's, forward and backward (a 2-core AVX-512 Xeon,
# HISTORY.md): 128 channels from 16x16 maps at batch 4 (1,024 pixels); below, its weight
# transform and short blocks cost more than the 2.25x fewer multiplies save.
_WINOGRAD_PIXELS_PER_WEIGHT = 0.05
# Up to 256 x 256 channels: larger transformed weights (16 cin cout floats) leave the L2.
_WINOGRAD_MAX_WEIGHTS = 256 * 256


def _float_conv(dtype, device_type: str, x_shape, w_shape, k: int, stride, padding, dilation, groups):
    """(pixels, cin, cout) of a float32 CPU convolution with a k x k kernel, stride 1, padding
    k // 2, one group, on CPUs with the FMA kernels; None for any other."""
    if device_type != "cpu" or dtype != torch.float32 or len(x_shape) != 4 or len(w_shape) != 4:
        return None
    cout, cin, kh, kw = w_shape
    p = k // 2
    if (kh, kw) != (k, k) or cin != x_shape[1] or (tuple(stride), tuple(padding), tuple(dilation), groups) != (
            (1, 1), (p, p), (1, 1), 1) or not fma_available():
        return None
    return x_shape[0] * x_shape[2] * x_shape[3], cin, cout


def _winograd_takes(dtype, device_type: str, x_shape, w_shape, stride, padding, dilation, groups) -> bool:
    conv = _float_conv(dtype, device_type, x_shape, w_shape, 3, stride, padding, dilation, groups)
    if conv is None:
        return False
    pixels, cin, cout = conv
    return cout * cin <= _WINOGRAD_MAX_WEIGHTS and 0 < pixels and pixels >= _WINOGRAD_PIXELS_PER_WEIGHT * cout * cin


def runs_winograd(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    """Whether this convolution of x runs on fasthg's Winograd kernel (forward and backward)."""
    dtype = x.dtype if weight.dtype == x.dtype else None
    return _winograd_takes(dtype, x.device.type, x.shape, weight.shape, stride, padding, dilation, groups)


# float32 1x1 convolutions (stride 1, no padding): the backward on fasthg::conv2d_backward, the
# 1x1 unit's float kernel without its BN-ReLU (one pass over the output gradient for the three
# gradients). oneDNN's took 8-26% longer at the hourglass's 64x64 and 128x128 maps (batch 4),
# as long at 32x32, and less with 16 channels (a 2-core AVX-512 Xeon, HISTORY.md).
_FLOAT_1X1_MIN_PIXELS = 16384
_FLOAT_1X1_MIN_CHANNELS = 64


def _float_1x1_takes(dtype, device_type: str, x_shape, w_shape, stride, padding, dilation, groups) -> bool:
    conv = _float_conv(dtype, device_type, x_shape, w_shape, 1, stride, padding, dilation, groups)
    if conv is None:
        return False
    pixels, cin, cout = conv
    return pixels >= _FLOAT_1X1_MIN_PIXELS and min(cin, cout) >= _FLOAT_1X1_MIN_CHANNELS


def _takes(dtype, device_type: str, x_shape, w_shape, stride, padding, dilation, groups) -> bool:
    if _winograd_takes(dtype, device_type, x_shape, w_shape, stride, padding, dilation, groups):
        return True
    if _float_1x1_takes(dtype, device_type, x_shape, w_shape, stride, padding, dilation, groups):
        return True
    if device_type != "cpu" or dtype != torch.bfloat16 or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    cout, cin, k, kw = w_shape
    geometry = (tuple(stride), tuple(padding), tuple(dilation), groups)
    if kw != k or k % 2 == 0 or geometry != ((1, 1), (k // 2, k // 2), (1, 1), 1):
        return False
    if cin != x_shape[1] or cin % 2 or cout % 2:
        return False
    # Enough pixels per weight element: below, oneDNN's own backward ran as fast or faster (its
    # parallel split needs no reduction of per-thread weight gradients). Measured on an AMX Xeon
    # (HISTORY.md): hg2's 64x64 and 1x1 32x32 layers gain, ResNet-50's layers past its first stage
    # lose; small weights gained at every size (_SMALL_WEIGHTS).
    pixels = x_shape[0] * x_shape[2] * x_shape[3]
    if cout * cin <= _SMALL_WEIGHTS.get(k, 0):
        return pixels > 0 and amx_available()
    return pixels >= max(_MIN_PIXELS, _PIXELS_PER_WEIGHT * cout * cin * k * k) and amx_available()


def backward_fuses(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups) -> bool:
    """Whether the backward of this convolution of x runs on fasthg's kernels: the AMX one
    (bf16, the geometry it has, enough pixels per weight element), the Winograd one (float32
    3x3) or the float one of large float32 1x1s."""
    dtype = x.dtype if weight.dtype == x.dtype else None
    return _takes(dtype, x.device.type, x.shape, weight.shape, stride, padding, dilation, groups)


def backward(grad, x, weight, has_bias: bool, stride, padding, dilation, groups, mask, param_dtype=None):
    """aten.convolution_backward(grad, x, weight, ...)'s (grad_x, grad_weight, grad_bias) for
    the gradients mask asks for, from fasthg's kernel where it runs; the weight and bias
    gradients in param_dtype (the parameters' own dtype, where weight is their autocast cast)."""
    mask = [mask[0], mask[1], has_bias and mask[2]]
    if (mask[1] or mask[2]) and runs_winograd(x, weight, stride, padding, dilation, groups):
        gx, gw, gb = torch.ops.fasthg.conv3x3_winograd_backward(grad, x, weight, mask[0])
        gx, gw, gb = gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None
    elif (mask[1] or mask[2]) and backward_fuses(x, weight, stride, padding, dilation, groups):
        # the kernel writes float32 from its float sums itself; other dtypes are cast below
        direct = torch.float32 if param_dtype == torch.float32 else None
        gx, gw, gb = torch.ops.fasthg.conv2d_backward(grad, x, weight, mask[0], direct)
        gx, gw, gb = gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None
    else:
        gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]] if has_bias else None,
                                                         stride, padding, dilation, False, [0, 0], groups, mask)
    if param_dtype is not None:  # (.to of the dtype a tensor has is the tensor itself)
        gw, gb = [None if g is None else g.to(param_dtype) for g in (gw, gb)]
    return gx, gw, gb


def _fake_backward(grad_out, x, weight, input_grad, grad_weight_dtype=None):
    gx = torch.empty_like(x) if input_grad else x.new_empty(0)
    dtype = grad_weight_dtype or weight.dtype
    return gx, torch.empty_like(weight, dtype=dtype), weight.new_empty(weight.shape[:1], dtype=dtype)


def _fake_winograd(x, weight, bias=None):
    y = x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))
    return y.contiguous(memory_format=suggest_memory_format(x))  # (as the kernel's output)


def _fake_winograd_backward(grad_out, x, weight, input_grad):
    gx = x.new_empty(x.shape).contiguous(memory_format=suggest_memory_format(x)) if input_grad else x.new_empty(0)
    return gx, torch.empty_like(weight), weight.new_empty(weight.shape[:1])


if _ext.LOAD_ERROR is None and hasattr(getattr(torch.ops, "fasthg", None), "conv2d_backward"):
    torch.library.register_fake("fasthg::conv2d_backward", _fake_backward)
if _ext.LOAD_ERROR is None and hasattr(getattr(torch.ops, "fasthg", None), "conv3x3_winograd"):
    torch.library.register_fake("fasthg::conv3x3_winograd", _fake_winograd)
    torch.library.register_fake("fasthg::conv3x3_winograd_backward", _fake_winograd_backward)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of x computes in: autocast's where it is on (as ATen's)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _routable(x: torch.Tensor, conv: nn.Module, backend: str) -> bool:
    """A backend other than eager, an nn.Conv2d (or fasthg.nn.Conv2d) with numeric zero
    padding, a 4-D channels_last x."""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    if backend == "eager" or not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        return False
    return not isinstance(conv.padding, str) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _wants_grad(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)


def fuses(x: torch.Tensor, conv: nn.Module, backend: str = "auto") -> bool:
    """Whether conv2d trains on fasthg's kernels: _routable (a backend other than eager, an
    nn.Conv2d or fasthg.nn.Conv2d with numeric zero padding, x channels_last), gradients
    wanted, and the geometry, dtype and size backward_fuses takes."""
    if not _routable(x, conv, backend) or not _wants_grad(x, conv):
        return False
    return _takes(compute_dtype(x), x.device.type, x.shape, conv.weight.shape, conv.stride, conv.padding,
                  conv.dilation, conv.groups)


def infers_winograd(x: torch.Tensor, conv: nn.Module, backend: str = "auto") -> bool:
    """Whether conv2d runs an inference forward (no gradient wanted) on the Winograd kernel:
    _routable, float32 (no autocast to another dtype), and the size runs_winograd takes."""
    if not _routable(x, conv, backend) or _wants_grad(x, conv) or compute_dtype(x) != torch.float32:
        return False
    bias_ok = conv.bias is None or conv.bias.dtype == x.dtype
    return bias_ok and runs_winograd(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)


def save_cast(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
    """The forward half of a convolution's autograd Function (_Conv2d, conv_add's): the weight
    and bias cast to the compute dtype here, inside the Function, so that their gradients come
    back from `backward_grads` in the parameters' dtype (float32 under autocast straight from
    fasthg's kernel: no bf16 rounding and no autograd cast back)."""
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    ctx.save_for_backward(x, w)
    ctx.conf = (stride, padding, dilation, groups, bias is not None, weight.dtype)
    return w, b


def backward_grads(ctx, grad):
    """(grad_x, grad_weight, grad_bias) of a Function whose forward ran save_cast."""
    x, w = ctx.saved_tensors
    stride, padding, dilation, groups, has_bias, param_dtype = ctx.conf
    return backward(grad, x, w, has_bias, stride, padding, dilation, groups, ctx.needs_input_grad[:3], param_dtype)


def forward(x, weight, bias, stride, padding, dilation, groups):
    """aten.convolution(x, weight, bias, ...), on fasthg's Winograd kernel where runs_winograd."""
    if runs_winograd(x, weight, stride, padding, dilation, groups) and (bias is None or bias.dtype == x.dtype):
        return torch.ops.fasthg.conv3x3_winograd(x, weight, bias)
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        w, b = save_cast(ctx, x, weight, bias, dtype, stride, padding, dilation, groups)
        return forward(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        return backward_grads(ctx, grad) + (None,) * 5


def conv2d(x: torch.Tensor, conv: nn.Conv2d, backend: str = "auto") -> torch.Tensor:
    """conv(x), on fasthg's kernels where `fuses` (training) or `infers_winograd` says so."""
    if not fuses(x, conv, backend):
        if infers_winograd(x, conv, backend):
            return torch.ops.fasthg.conv3x3_winograd(x, conv.weight, conv.bias)
        return nn.Conv2d.forward(conv, x)
    dtype = compute_dtype(x)
    return _Conv2d.apply(x.to(dtype), conv.weight, conv.bias, dtype, list(conv.stride), list(conv.padding),
                         list(conv.dilation), conv.groups)
