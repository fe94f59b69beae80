"""bn_add_relu: max(0, BatchNorm2d(x) + residual) fused, a residual block's end (ResNet's
`out = bn3(conv3(...)); out += identity; out = relu(out)`), for training and inference.

Training forward: bn_relu's statistics pass over x, then one pass reading x and the residual
and writing y; running statistics are updated as nn.BatchNorm2d does. Autograd saves x, y and
the per-channel statistics (y is the block's output, kept alive by whatever reads it next, so
saving it costs no memory; the ReLU mask cannot come from x once the residual is added). The
backward is two passes: one reads grad_out, y and x, writes g = grad_out where y > 0 (which is
grad_residual) and sums g and g * xhat; one reads g and x and writes grad_x. Backends: eager
(fasthg.ops.reference), native (fasthg::bn_add_relu_* from csrc/, CPU and CUDA), triton
(kernels/bn_add_relu.py as fasthg::bn_add_relu_*_triton); each takes its statistics from the
same backend's bn_relu_stats. Native training without sync is one op, fasthg::bn_add_relu_train,
whose autograd kernel is C++ (csrc/autograd/bn_add_relu.cpp): the same passes, without the
Python between them. Statistics and parameters are float32 (float64 for float64 x).
sync=True merges the statistics across processes as fasthg.ops.bn_relu does (nn.SyncBatchNorm).
"""
from types import SimpleNamespace

import torch

from fasthg.ops import _backend, _ext, reference, registry
from fasthg.ops.bn_relu import (_OPS as _BN_RELU_OPS, _affine, _batch_statistics, _grad_means, _param_dtype,
                                _running_invstd, _sync_group, _update_running_stats, check_args as _check_bn_args)
from fasthg.ops.layout import memory_format_of


def check_args(x, residual, weight, bias, running_mean, running_var, training):
    _check_bn_args(x, weight, bias, running_mean, running_var, training)
    if not isinstance(residual, torch.Tensor):
        raise ValueError(f"bn_add_relu: `residual` must be a tensor like `x`, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"bn_add_relu: `residual` must match `x` ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")


def _fake_forward(x, residual, mean, invstd, weight, bias):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fake_reduce(grad_out, y, x, mean, invstd):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=memory_format_of(x)), x.new_empty(c, dtype=_param_dtype(x)),
            x.new_empty(c, dtype=_param_dtype(x)))


def _fake_elemt(g, x, mean, invstd, weight, mean_g, mean_g_xhat):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fake_train(x, residual, weight, bias, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=memory_format_of(x)), x.new_empty(c, dtype=_param_dtype(x)),
            x.new_empty(c, dtype=_param_dtype(x)))


# Per backend: its statistics (bn_relu's) and its three passes; on `train_devices`, training
# without sync is `train` instead (one C++ autograd op, csrc/autograd/bn_add_relu.cpp).
_OPS = {"eager": SimpleNamespace(stats=reference.bn_relu_stats, forward=reference.bn_add_relu_forward,
                                 backward_reduce=reference.bn_add_relu_backward_reduce,
                                 backward_elemt=reference.bn_add_relu_backward_elemt, train_devices=())}
if _ext._C is not None:
    torch.library.register_fake("fasthg::bn_add_relu_forward")(_fake_forward)
    torch.library.register_fake("fasthg::bn_add_relu_backward_reduce")(_fake_reduce)
    torch.library.register_fake("fasthg::bn_add_relu_backward_elemt")(_fake_elemt)
    torch.library.register_fake("fasthg::bn_add_relu_train")(_fake_train)
    _OPS["native"] = SimpleNamespace(stats=_BN_RELU_OPS["native"].stats,
                                     forward=torch.ops.fasthg.bn_add_relu_forward,
                                     backward_reduce=torch.ops.fasthg.bn_add_relu_backward_reduce,
                                     backward_elemt=torch.ops.fasthg.bn_add_relu_backward_elemt,
                                     train=torch.ops.fasthg.bn_add_relu_train, train_devices=("cpu", "cuda"))

if _backend.triton_available():
    from fasthg.kernels import bn_add_relu as _tk

    @torch.library.custom_op("fasthg::bn_add_relu_forward_triton", mutates_args=())
    def _forward_triton(x: torch.Tensor, residual: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _tk.forward(x, residual, mean, invstd, weight, bias)

    @torch.library.custom_op("fasthg::bn_add_relu_backward_reduce_triton", mutates_args=())
    def _reduce_triton(grad_out: torch.Tensor, y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                       invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.backward_reduce(grad_out, y, x, mean, invstd)

    @torch.library.custom_op("fasthg::bn_add_relu_backward_elemt_triton", mutates_args=())
    def _elemt_triton(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                      weight: torch.Tensor, mean_g: torch.Tensor, mean_g_xhat: torch.Tensor) -> torch.Tensor:
        return _tk.backward_elemt(g, x, mean, invstd, weight, mean_g, mean_g_xhat)

    _forward_triton.register_fake(_fake_forward)
    _reduce_triton.register_fake(_fake_reduce)
    _elemt_triton.register_fake(_fake_elemt)
    if "triton" in _BN_RELU_OPS:
        _OPS["triton"] = SimpleNamespace(stats=_BN_RELU_OPS["triton"].stats,
                                         forward=torch.ops.fasthg.bn_add_relu_forward_triton,
                                         backward_reduce=torch.ops.fasthg.bn_add_relu_backward_reduce_triton,
                                         backward_elemt=torch.ops.fasthg.bn_add_relu_backward_elemt_triton,
                                         train_devices=())


class _BNAddReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, training, momentum, eps, ops, group):
        count = None
        if training:
            mean, var, invstd, count = _batch_statistics(ops, x, eps, group)
            if running_mean is not None:
                _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        else:
            mean, invstd = _running_invstd(running_mean, running_var, eps, weight.dtype)
        y = ops.forward(x, residual, mean, invstd, weight, bias)
        ctx.save_for_backward(x, y, weight, mean, invstd)
        ctx.training, ctx.count, ctx.ops, ctx.group = training, count, ops, group
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, y, weight, mean, invstd = ctx.saved_tensors
        g, sum_g, sum_gx = ctx.ops.backward_reduce(grad_out, y, x, mean, invstd)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                mean_g, mean_gx = _grad_means(sum_g, sum_gx, ctx.count, ctx.group)
            else:  # the statistics are constants
                mean_g = mean_gx = torch.zeros_like(sum_g)
            grad_x = ctx.ops.backward_elemt(g, x, mean, invstd, weight, mean_g, mean_gx)
        return grad_x, g, sum_gx, sum_g, None, None, None, None, None, None, None


def bn_add_relu(x, residual, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                momentum=0.1, eps=1e-5, backend="auto", sync=False, process_group=None):
    """relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    + residual), fused; `residual` has x's shape, dtype and device. Arguments as
    fasthg.ops.bn_relu's (weight/bias None: affine=False; running stats None: batch statistics
    only; sync/process_group: statistics across processes)."""
    check_args(x, residual, weight, bias, running_mean, running_var, training)
    which = _backend.resolve(backend, "bn_add_relu", x)
    group = _sync_group(sync, process_group) if training else None
    if which == "eager" and group is None:
        return reference.bn_add_relu(x, residual, weight, bias, running_mean, running_var, training, momentum, eps)
    c = x.shape[1]
    weight, bias = _affine(x, weight, bias)
    ops = _OPS[which]
    if training and group is None and x.device.type in ops.train_devices:
        y, mean, var = ops.train(x, residual, weight, bias, float(eps))
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
        return y
    if not training and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, weight, bias))):
        # inference: one elementwise op, without an autograd Function around it
        return ops.forward(x, residual, *_running_invstd(running_mean, running_var, eps, weight.dtype), weight, bias)
    return _BNAddReLU.apply(x, residual, weight, bias, running_mean, running_var, bool(training), float(momentum),
                            float(eps), ops, group)


# Bytes moved, in full tensors: the training forward reads x for the statistics, then x and
# the residual to write y; its backward reads grad, y and x and writes g, then reads g and x
# to write grad_x; eval reads x and the residual and writes y.
OP = registry.register(registry.FusedOp(
    name="bn_add_relu", kernel="bn_add_relu_forward",
    schemas=("bn_add_relu_forward", "bn_add_relu_backward_reduce", "bn_add_relu_backward_elemt", "bn_add_relu_train"),
    reference=reference.bn_add_relu, fn=bn_add_relu,
    traffic={"train forward": 4.0, "eval forward": 3.0, "train forward+backward": 11.0},
    # ResNet-50's block outputs at 224x224, its four stages: the hourglass has no BN-add-ReLU
    shapes=((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))))
