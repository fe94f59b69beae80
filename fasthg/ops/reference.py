"""Eager PyTorch compositions of every fused op: the `eager` backend and the tests'
reference (the tests run them in float64)."""
import torch
import torch.nn.functional as F


def upsample_add(low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """skip + nearest upsampling of `low` to skip's spatial size."""
    return skip + F.interpolate(low, size=skip.shape[-2:], mode="nearest")


def upsample_add_(low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """upsample_add written into skip."""
    return skip.add_(F.interpolate(low, size=skip.shape[-2:], mode="nearest"))


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """nn.MaxPool2d(2, 2): the maximum of each 2x2 window, stride 2, floor mode."""
    return F.max_pool2d(x, 2, 2)


def bn_relu(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
    """relu(batch_norm(x)): updates the running statistics in place when training."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))


# The four passes of the fused BN-ReLU, composed from stock ops: the `eager` backend uses them
# when statistics are synchronised across processes (plain F.batch_norm cannot be). Math in
# the parameters' dtype (float32, float64 for float64 x), as the kernels do.
def _per_channel(t):
    return t.view(1, -1, 1, 1)


def bn_relu_stats(x):
    p = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = x.to(p)
    return xp.mean((0, 2, 3)), xp.var((0, 2, 3), unbiased=False)


def _pre_activation(x, mean, invstd, weight, bias):
    return (x.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd * weight) + _per_channel(bias)


def bn_relu_forward(x, mean, invstd, weight, bias):
    return torch.relu(_pre_activation(x, mean, invstd, weight, bias)).to(x.dtype)


def _masked_grad_and_xhat(grad_out, x, mean, invstd, weight, bias):
    """grad_out where the forward output was not <= 0 (the ReLU mask, recomputed; a NaN
    passes, as in relu's backward), and xhat."""
    g = torch.where(_pre_activation(x, mean, invstd, weight, bias) <= 0, 0, grad_out.to(mean.dtype))
    return g, (x.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd)


def bn_relu_backward_reduce(grad_out, x, mean, invstd, weight, bias):
    g, xhat = _masked_grad_and_xhat(grad_out, x, mean, invstd, weight, bias)
    return g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))


def bn_relu_backward_elemt(grad_out, x, mean, invstd, weight, bias, mean_g, mean_g_xhat):
    g, xhat = _masked_grad_and_xhat(grad_out, x, mean, invstd, weight, bias)
    dx = _per_channel(weight * invstd) * (g - _per_channel(mean_g) - xhat * _per_channel(mean_g_xhat))
    return dx.to(x.dtype)


def bn_relu_conv1x1(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training: bool = True,
                    out_stats: bool = False):
    """conv1x1(relu((x - mean) * invstd * bn_weight + bn_bias)) (fasthg.ops.conv1x1's op). With
    `training`, mean and invstd are x's batch statistics: they are recomputed from x here (the
    variance with the eps the given invstd implies, so the values are the given ones) so that
    autograd differentiates through them, as BatchNorm's training backward does. With
    `out_stats`, also y's per-channel sum and sum of squares (without gradient)."""
    p = mean.dtype
    xp = x.to(p)
    if training:
        var = xp.var((0, 2, 3), unbiased=False)
        eps = (invstd.detach() ** -2 - var.detach())
        mean, invstd = xp.mean((0, 2, 3)), torch.rsqrt(var + eps)
    a = torch.relu((xp - _per_channel(mean)) * _per_channel(invstd * bn_weight) + _per_channel(bn_bias))
    y = F.conv2d(a.to(x.dtype), conv_weight.to(x.dtype), None if conv_bias is None else conv_bias.to(x.dtype))
    if not out_stats:
        return y
    yd = y.detach().to(p)
    return y, yd.sum((0, 2, 3)), (yd * yd).sum((0, 2, 3))


def bn_add_relu(x, residual, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
    """relu(batch_norm(x) + residual), a residual block's end: updates the running statistics
    in place when training."""
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)


# Its three passes (the statistics are bn_relu_stats'), for the eager backend with statistics
# synchronised across processes; math in the parameters' dtype, as the kernels do.
def bn_add_relu_forward(x, residual, mean, invstd, weight, bias):
    return torch.relu(_pre_activation(x, mean, invstd, weight, bias) + residual.to(mean.dtype)).to(x.dtype)


def bn_add_relu_backward_reduce(grad_out, y, x, mean, invstd):
    """g = grad_out where y > 0 (a NaN y passes, as relu's backward), and the sums of g and g * xhat."""
    g = torch.where(y <= 0, 0, grad_out)
    gp = g.to(mean.dtype)
    xhat = (x.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd)
    return g, gp.sum((0, 2, 3)), (gp * xhat).sum((0, 2, 3))


def bn_add_relu_backward_elemt(g, x, mean, invstd, weight, mean_g, mean_g_xhat):
    xhat = (x.to(mean.dtype) - _per_channel(mean)) * _per_channel(invstd)
    dx = _per_channel(weight * invstd) * (g.to(mean.dtype) - _per_channel(mean_g) - xhat * _per_channel(mean_g_xhat))
    return dx.to(x.dtype)
