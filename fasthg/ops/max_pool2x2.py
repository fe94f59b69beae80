"""max_pool2x2(x) = nn.MaxPool2d(2, 2)(x) (2x2 windows, stride 2, floor mode): the hourglass's
pool, whose autograd keeps only its input.

nn.MaxPool2d saves its input and the argmax indices (int64: twice the bytes of a float32
output) and its backward zero-fills grad_x, then scatters into it. In the hourglass the pool's
input is saved anyway (the up branch's first BN keeps it), so this op saves x alone and its
backward finds each window's maximum again from x, writing grad_x in one pass. Values and
gradients equal max_pool2d's exactly, ties and NaN included: the first of equal maxima, the
last NaN of a window (csrc/max_pool2x2.h).

Backends: eager (fasthg.ops.reference: F.max_pool2d, which saves indices), native
(fasthg::max_pool2x2 from csrc/, CPU and CUDA, with its autograd in
csrc/autograd/max_pool2x2.cpp) and triton (kernels/max_pool2x2.py, registered here as
fasthg::max_pool2x2_triton).
"""
import torch

from fasthg.ops import _backend, _ext, reference, registry
from fasthg.ops.layout import memory_format_of


def check_args(x: torch.Tensor) -> None:
    """The errors every backend gives for bad input (the C++ ops check the same)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"max_pool2x2: `x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"max_pool2x2: `x` must be a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"max_pool2x2: `x` must have a floating-point dtype, got {x.dtype}")
    n, c, h, w = x.shape
    if n < 1 or c < 1 or h < 2 or w < 2:
        raise ValueError(f"max_pool2x2: `x` must have N, C >= 1 and H, W >= 2, got shape {tuple(x.shape)}")


def _fake_forward(x):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h // 2, w // 2)).contiguous(memory_format=memory_format_of(x))


def _fake_backward(grad_out, x):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fake_backward_skip(grad_out, x, grad_skip):
    return _fake_backward(grad_out, x)


if _ext._C is not None:  # (its autograd kernel is C++: csrc/autograd/max_pool2x2.cpp)
    torch.library.register_fake("fasthg::max_pool2x2")(_fake_forward)
    torch.library.register_fake("fasthg::max_pool2x2_backward")(_fake_backward)
    torch.library.register_fake("fasthg::max_pool2x2_backward_skip")(_fake_backward_skip)

if _backend.triton_available():
    from fasthg.kernels import max_pool2x2 as _tk

    @torch.library.custom_op("fasthg::max_pool2x2_triton", mutates_args=())
    def _max_pool2x2_triton(x: torch.Tensor) -> torch.Tensor:
        return _tk.max_pool2x2(x)

    @torch.library.custom_op("fasthg::max_pool2x2_backward_triton", mutates_args=())
    def _max_pool2x2_backward_triton(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _tk.max_pool2x2_backward(grad_out, x)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, grad_out):
        return torch.ops.fasthg.max_pool2x2_backward_triton(grad_out, ctx.saved_tensors[0])

    _max_pool2x2_triton.register_fake(_fake_forward)
    _max_pool2x2_backward_triton.register_fake(_fake_backward)
    _max_pool2x2_triton.register_autograd(_backward, setup_context=_setup_context)


def max_pool2x2(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """F.max_pool2d(x, 2, 2), fused: [N, C, H, W] -> [N, C, H // 2, W // 2], in x's memory
    format (NCHW or channels_last; other strides are copied into one of those). The native and
    triton backends save only x for backward."""
    check_args(x)
    which = _backend.resolve(backend, "max_pool2x2", x)
    if which == "native":
        return torch.ops.fasthg.max_pool2x2(x)
    if which == "triton":
        return torch.ops.fasthg.max_pool2x2_triton(x)
    return reference.max_pool2x2(x)


class _MaxPool2x2Skip(torch.autograd.Function):
    """The native pool of an x that also feeds another branch: (y, x), x passed through, so
    that the branch's gradient comes back here and is added to grad_x in the pool's backward
    pass (fasthg::max_pool2x2_backward_skip) rather than by autograd in a pass of its own."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)
        return torch.ops.fasthg.max_pool2x2(x), x

    @staticmethod
    def backward(ctx, grad_y, grad_skip):
        if grad_y is None:
            return grad_skip
        x, = ctx.saved_tensors
        if grad_skip is None:
            return torch.ops.fasthg.max_pool2x2_backward(grad_y, x)
        return torch.ops.fasthg.max_pool2x2_backward_skip(grad_y, x, grad_skip)


def max_pool2x2_with_skip(x: torch.Tensor, backend: str = "auto"):
    """(max_pool2x2(x), skip) for an x that another branch also takes, which should take
    `skip` instead: x's values (a view), whose gradient the native backend adds to grad_x in
    the pool's own backward pass. Without a gradient, or on another backend, skip is x."""
    check_args(x)
    which = _backend.resolve(backend, "max_pool2x2", x)
    if which == "native" and x.requires_grad and torch.is_grad_enabled():
        return _MaxPool2x2Skip.apply(x)
    return max_pool2x2(x, backend=which), x


# Bytes moved, in full-resolution tensors (x's size): the forward reads x and writes a quarter;
# the backward reads x and grad_out (a quarter) and writes grad_x.
OP = registry.register(registry.FusedOp(
    name="max_pool2x2", kernel="max_pool2x2", schemas=("max_pool2x2", "max_pool2x2_backward", "max_pool2x2_backward_skip"),
    reference=reference.max_pool2x2, fn=max_pool2x2,
    traffic={"forward": 1.25, "forward+backward": 3.5}))

