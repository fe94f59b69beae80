"""max_pool2d that keeps only its input for backward (memory="recompute").

nn.MaxPool2d saves its input and the argmax indices (int64: twice the bytes of a float32
output). In the hourglass the pool's input is saved anyway (the up-branch residual's BN keeps
it), so here the backward recomputes the indices from it (one more pooling pass) and only the
input is kept. Same values and gradients as nn.MaxPool2d (ties: the same first maximum)."""
import torch
from torch import nn


class _MaxPoolRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        args = (kernel_size, stride, padding, dilation, ceil_mode)
        out, _ = torch.ops.aten.max_pool2d_with_indices(x, *args)
        ctx.save_for_backward(x)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *ctx.args)
        return (torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.args, indices),) + (None,) * 5


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def max_pool2d(x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """pool(x), recomputing the argmax in backward instead of saving it (training with grad);
    plain pool(x) otherwise."""
    if not (torch.is_grad_enabled() and x.requires_grad) or pool.return_indices:
        return pool(x)
    if x.dim() != 4:
        raise ValueError(f"max_pool2d: `x` must be a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return _MaxPoolRecompute.apply(x, _pair(pool.kernel_size), _pair(stride), _pair(pool.padding),
                                   _pair(pool.dilation), bool(pool.ceil_mode))
