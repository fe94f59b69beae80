"""upsample_add(low, skip) = skip + nearest_upsample(low, size=skip's H, W): the hourglass's
skip merge, in one pass instead of materialising the upsampled tensor.

Backends: eager (fasthg.ops.reference), native (fasthg::upsample_add from csrc/, CPU and CUDA)
and triton (kernels/upsample_add.py, registered here as fasthg::upsample_add_triton). Both
custom ops get the same autograd: grad_skip is grad_out itself, grad_low its block sum (the
native op's in C++, csrc/autograd/upsample_add.cpp, the Triton op's here).

Any ratio of sizes follows F.interpolate(mode="nearest", size=...) exactly (including
non-integer ratios and shrinking); the hourglass always uses exactly 2x.
"""
import torch

from fasthg.ops import _ext, reference
from fasthg.ops.layout import memory_format_of
from fasthg.ops import _backend, registry


def check_args(low: torch.Tensor, skip: torch.Tensor) -> None:
    """The errors every backend gives for bad input (the C++ ops check the same)."""
    for name, t in (("low", low), ("skip", skip)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"upsample_add: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"upsample_add: `{name}` must be a 4-D [N, C, H, W] tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"upsample_add: `{name}` must have a floating-point dtype, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"upsample_add: empty tensors are not supported, got `{name}` of shape {tuple(t.shape)}")
    if low.shape[:2] != skip.shape[:2]:
        raise ValueError("upsample_add: `low` and `skip` must have the same batch and channel sizes, "
                         f"got {tuple(low.shape)} and {tuple(skip.shape)}")
    if low.dtype != skip.dtype:
        raise ValueError(f"upsample_add: `low` and `skip` must have the same dtype, got {low.dtype} and {skip.dtype}")
    if low.device != skip.device:
        raise ValueError(f"upsample_add: `low` and `skip` must be on the same device, got {low.device} and {skip.device}")


def _fake_forward(low, skip):
    return torch.empty_like(skip, memory_format=memory_format_of(skip))


def _fake_backward(grad_out, low_h, low_w):
    n, c = grad_out.shape[:2]
    return grad_out.new_empty((n, c, low_h, low_w)).contiguous(memory_format=memory_format_of(grad_out))


def _setup_context(ctx, inputs, output):
    low, _ = inputs
    ctx.low_hw = low.shape[-2:]


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        return backward_op(grad_out, ctx.low_hw[0], ctx.low_hw[1]), grad_out

    return backward


def _fake_inplace(low, skip):
    return None


if _ext._C is not None:  # (its autograd kernel is C++: csrc/autograd/upsample_add.cpp)
    torch.library.register_fake("fasthg::upsample_add")(_fake_forward)
    torch.library.register_fake("fasthg::upsample_add_backward")(_fake_backward)
    torch.library.register_fake("fasthg::upsample_add_inplace")(_fake_inplace)

if _backend.triton_available():
    from fasthg.kernels import upsample_add as _tk

    @torch.library.custom_op("fasthg::upsample_add_triton", mutates_args=())
    def _upsample_add_triton(low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return _tk.upsample_add(low, skip)

    @torch.library.custom_op("fasthg::upsample_add_backward_triton", mutates_args=())
    def _upsample_add_backward_triton(grad_out: torch.Tensor, low_h: int, low_w: int) -> torch.Tensor:
        return _tk.upsample_add_backward(grad_out, low_h, low_w)

    @torch.library.custom_op("fasthg::upsample_add_inplace_triton", mutates_args=("skip",))
    def _upsample_add_inplace_triton(low: torch.Tensor, skip: torch.Tensor) -> None:
        _tk.upsample_add(low, skip, inplace=True)

    _upsample_add_triton.register_fake(_fake_forward)
    _upsample_add_inplace_triton.register_fake(_fake_inplace)
    _upsample_add_backward_triton.register_fake(_fake_backward)
    _upsample_add_triton.register_autograd(
        _make_backward(torch.ops.fasthg.upsample_add_backward_triton), setup_context=_setup_context)


def upsample_add(low: torch.Tensor, skip: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """skip + F.interpolate(low, size=skip.shape[-2:], mode="nearest"), fused.

    low: [N, C, h, w], skip: [N, C, H, W], same dtype and device. The output has skip's
    memory format (NCHW or channels_last); other strides are copied into one of those.
    """
    check_args(low, skip)
    which = _backend.resolve(backend, "upsample_add", skip)
    if which == "native":
        return torch.ops.fasthg.upsample_add(low, skip)
    if which == "triton":
        return torch.ops.fasthg.upsample_add_triton(low, skip)
    return reference.upsample_add(low, skip)


def upsample_add_(low: torch.Tensor, skip: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """upsample_add written into `skip` (returned): for inference, where nothing reads skip
    afterwards; it saves the output's allocation. No autograd: raises where a gradient would be
    needed. A skip that is not dense (NCHW or channels_last) is written through a copy."""
    check_args(low, skip)
    if torch.is_grad_enabled() and (low.requires_grad or skip.requires_grad):
        raise ValueError("upsample_add_: writes `skip` in place and has no autograd; with tensors that require "
                         "grad use upsample_add")
    if low.untyped_storage().data_ptr() == skip.untyped_storage().data_ptr():
        raise ValueError("upsample_add_: `low` and `skip` share memory; the in-place write would change `low`")
    which = _backend.resolve(backend, "upsample_add", skip)
    if which == "eager":
        return reference.upsample_add_(low, skip)
    if not skip.is_contiguous(memory_format=memory_format_of(skip)):
        return skip.copy_(upsample_add(low, skip, backend=which))
    if which == "native":
        torch.ops.fasthg.upsample_add_inplace(low, skip)
    else:
        torch.ops.fasthg.upsample_add_inplace_triton(low, skip)
    return skip


# Bytes moved, in full tensors: the forward reads low (1/4) and skip and writes out; the
# backward reads grad and writes grad_low (1/4; grad_skip is grad itself).
OP = registry.register(registry.FusedOp(
    name="upsample_add", kernel="upsample_add", schemas=("upsample_add", "upsample_add_backward", "upsample_add_inplace"),
    reference=reference.upsample_add, fn=upsample_add,
    traffic={"forward": 2.25, "forward+backward": 3.5}, bars={"forward+backward": 2.0}, shape_arg=1))
