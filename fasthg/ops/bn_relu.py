"""bn_relu: max(0, BatchNorm2d(x)) fused, for training and inference.

Training forward: one statistics pass (per-channel mean and biased variance) and one
normalise+clamp pass; running statistics are updated as nn.BatchNorm2d does. Backward saves
only x and the per-channel statistics and recomputes the ReLU mask from them: one reduction
pass and one elementwise pass. Native training (without sync, CPU and CUDA) is one op,
fasthg::bn_relu_train, whose autograd kernel is C++ (csrc/autograd/bn_relu.cpp) and runs each
direction as one call (fasthg::bn_relu_train_forward / _backward): the same passes, without
the Python and dispatch between them. bn_relu_with_skip is bn_relu for an x that a residual
block also feeds to its other branch: native training then adds that branch's gradient to
grad_x in the backward's elementwise pass (fasthg::bn_relu_train_backward_skip), where autograd
would add it in a pass of its own. Native CPU training can take the batch statistics from x's
per-channel sums (`sums`, which the fused conv1x1 unit gives as it writes x) instead of a pass
over x (fasthg::bn_relu_train_sums). Backends: eager (fasthg.ops.reference), native
(fasthg::bn_relu_* from csrc/, CPU and CUDA), triton (kernels/bn_relu.py as
fasthg::bn_relu_*_triton).
Statistics and parameters are float32 (float64 for float64 x) whatever x's dtype.

Cross-process statistics (sync=True, like nn.SyncBatchNorm): the forward all-gathers each
process's (count, mean, variance) and merges them exactly; the backward all-reduces the two
per-channel sums. N processes then compute what one would on the concatenated batch; the
weight and bias gradients stay local (DDP averages them), as in nn.SyncBatchNorm.
"""
from types import SimpleNamespace

import torch
import torch.distributed as dist

from fasthg.ops import _ext, reference
from fasthg.ops.layout import memory_format_of
from fasthg.ops import _backend, registry


def _param_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_args(x, weight, bias, running_mean, running_var, training):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"bn_relu: `x` must be a 4-D [N, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"bn_relu: `x` must have a floating-point dtype, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"bn_relu: `x` must not be empty, got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"bn_relu: `{name}` must have shape ({c},) for the {c} channels of `x`, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"bn_relu: `{name}` must be floating point, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"bn_relu: `{name}` must be on {x.device} like `x`, got {t.device}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bn_relu: eval mode (training=False) needs `running_mean` and `running_var`")
    if training and x.numel() // c <= 1:
        raise ValueError(f"bn_relu: expected more than 1 value per channel when training, got `x` of shape {tuple(x.shape)}")


def _fake_stats(x):
    c = x.shape[1]
    return x.new_empty(c, dtype=_param_dtype(x)), x.new_empty(c, dtype=_param_dtype(x))


def _fake_like_x(x_or_grad, x, *rest):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fake_forward(x, mean, invstd, weight, bias):
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _fake_forward_into(x, mean, invstd, weight, bias, out):
    return None


def _fake_reduce(grad_out, x, mean, invstd, weight, bias):
    return _fake_stats(x)


def _fake_train_forward(x, weight, bias, eps):
    mean, var = _fake_stats(x)
    return _fake_like_x(x, x), mean, var, torch.empty_like(mean)


def _fake_train_backward(grad_out, x, mean, invstd, weight, bias):
    return (_fake_like_x(grad_out, x),) + _fake_stats(x)


def _fake_train_backward_skip(grad_out, x, mean, invstd, weight, bias, grad_skip):
    return _fake_train_backward(grad_out, x, mean, invstd, weight, bias)


def _fake_train(x, weight, bias, eps):
    return (_fake_like_x(x, x),) + _fake_stats(x)


def _fake_train_forward_sums(x, sum, sum_sq, weight, bias, eps):
    return _fake_train_forward(x, weight, bias, eps)


def _fake_train_sums(x, sum, sum_sq, weight, bias, eps):
    return _fake_train(x, weight, bias, eps)


# Per backend, its four ops; on `train_devices`, training without sync is `train` instead.
_OPS = {"eager": SimpleNamespace(stats=reference.bn_relu_stats, forward=reference.bn_relu_forward,
                                 backward_reduce=reference.bn_relu_backward_reduce,
                                 backward_elemt=reference.bn_relu_backward_elemt, train_devices=())}
if _ext._C is not None:
    torch.library.register_fake("fasthg::bn_relu_stats")(_fake_stats)
    torch.library.register_fake("fasthg::bn_relu_forward")(_fake_forward)
    torch.library.register_fake("fasthg::bn_relu_forward_into")(_fake_forward_into)
    torch.library.register_fake("fasthg::bn_relu_backward_reduce")(_fake_reduce)
    torch.library.register_fake("fasthg::bn_relu_backward_elemt")(_fake_like_x)
    torch.library.register_fake("fasthg::bn_relu_train_forward")(_fake_train_forward)
    torch.library.register_fake("fasthg::bn_relu_train_backward")(_fake_train_backward)
    torch.library.register_fake("fasthg::bn_relu_train_backward_skip")(_fake_train_backward_skip)
    torch.library.register_fake("fasthg::bn_relu_train")(_fake_train)
    torch.library.register_fake("fasthg::bn_relu_train_forward_sums")(_fake_train_forward_sums)
    torch.library.register_fake("fasthg::bn_relu_train_sums")(_fake_train_sums)
    _OPS["native"] = SimpleNamespace(
        stats=torch.ops.fasthg.bn_relu_stats, forward=torch.ops.fasthg.bn_relu_forward,
        forward_into=torch.ops.fasthg.bn_relu_forward_into,
        backward_reduce=torch.ops.fasthg.bn_relu_backward_reduce,
        backward_elemt=torch.ops.fasthg.bn_relu_backward_elemt,
        train=torch.ops.fasthg.bn_relu_train, train_devices=("cpu", "cuda"))

if _backend.triton_available():
    from fasthg.kernels import bn_relu as _tk

    @torch.library.custom_op("fasthg::bn_relu_stats_triton", mutates_args=())
    def _stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.stats(x)

    @torch.library.custom_op("fasthg::bn_relu_forward_triton", mutates_args=())
    def _forward_triton(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        return _tk.forward(x, mean, invstd, weight, bias)

    @torch.library.custom_op("fasthg::bn_relu_backward_reduce_triton", mutates_args=())
    def _reduce_triton(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.backward_reduce(grad_out, x, mean, invstd, weight, bias)

    @torch.library.custom_op("fasthg::bn_relu_backward_elemt_triton", mutates_args=())
    def _elemt_triton(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor, mean_g: torch.Tensor,
                      mean_g_xhat: torch.Tensor) -> torch.Tensor:
        return _tk.backward_elemt(grad_out, x, mean, invstd, weight, bias, mean_g, mean_g_xhat)

    @torch.library.custom_op("fasthg::bn_relu_forward_into_triton", mutates_args=("out",))
    def _forward_into_triton(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor, out: torch.Tensor) -> None:
        _tk.forward(x, mean, invstd, weight, bias, out=out)

    _forward_into_triton.register_fake(_fake_forward_into)
    _stats_triton.register_fake(_fake_stats)
    _forward_triton.register_fake(_fake_forward)
    _reduce_triton.register_fake(_fake_reduce)
    _elemt_triton.register_fake(_fake_like_x)
    _OPS["triton"] = SimpleNamespace(stats=torch.ops.fasthg.bn_relu_stats_triton,
                                     forward=torch.ops.fasthg.bn_relu_forward_triton,
                                     forward_into=torch.ops.fasthg.bn_relu_forward_into_triton,
                                     backward_reduce=torch.ops.fasthg.bn_relu_backward_reduce_triton,
                                     backward_elemt=torch.ops.fasthg.bn_relu_backward_elemt_triton,
                                     train_devices=())


def _merge_across_processes(mean, var, count, group):
    """Exact (Chan) merge of every process's per-channel (count, mean, biased variance)."""
    c = mean.numel()
    local = torch.cat([mean.new_tensor([count], dtype=torch.float64), mean.double(), var.double()])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)
    n, m, v = g[:, :1], g[:, 1:1 + c], g[:, 1 + c:]
    total = n.sum()
    gmean = (n * m).sum(0) / total
    m2 = (n * v).sum(0) + (n * (m - gmean) ** 2).sum(0)
    return gmean.to(mean.dtype), (m2 / total).to(var.dtype), int(total.item())


def _batch_statistics(ops, x, eps, group):
    """Training statistics of x with a backend's `ops`: (mean, biased var, invstd, count),
    merged over the processes of `group` when it is not None."""
    count = x.numel() // x.shape[1]
    mean, var = ops.stats(x)
    if group is not None:
        mean, var, count = _merge_across_processes(mean, var, count, group)
    return mean, var, torch.rsqrt(var + eps), count


def _grad_means(sum_g, sum_gx, count, group):
    """The channel means of g and g * xhat that a training BN's grad_x needs, from this
    process's sums: over the global batch (all-reduced) when the statistics were."""
    if group is not None:
        both = torch.cat([sum_g, sum_gx])
        dist.all_reduce(both, group=group)
        sum_g, sum_gx = both.chunk(2)
    return sum_g / count, sum_gx / count


def _as_dtype(t, dtype):
    """t.to(dtype) without the dispatch when t already is (the dispatch is a measurable share of a
    4x4 BN-ReLU)."""
    return t if t.dtype == dtype else t.to(dtype)


def _affine(x, weight, bias):
    """The BN's weight and bias in the statistics' dtype: ones and zeros where it has none."""
    pdtype, c = _param_dtype(x), x.shape[1]
    return (x.new_ones(c, dtype=pdtype) if weight is None else _as_dtype(weight, pdtype),
            x.new_zeros(c, dtype=pdtype) if bias is None else _as_dtype(bias, pdtype))


def _train_backward(grad_y, x, mean, invstd, weight, bias, grad_skip=None):
    """The native one-call training backward, (grad_x, sum_g, sum_g_xhat), with grad_skip
    (the gradient of a branch that also took x) added to grad_x where it is not None."""
    if grad_skip is None:
        return torch.ops.fasthg.bn_relu_train_backward(grad_y, x, mean, invstd, weight, bias)
    return torch.ops.fasthg.bn_relu_train_backward_skip(grad_y, x, mean, invstd, weight, bias, grad_skip)


def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """As nn.BatchNorm2d: the unbiased batch variance goes into running_var. (One foreach
    call, half the time of two lerps; mean and var never require grad. `var.mul(f)` rather
    than `var * f`, which converts f to a tensor first.)"""
    torch._foreach_lerp_((running_mean, running_var),
                         (_as_dtype(mean, running_mean.dtype), _as_dtype(var.mul(count / (count - 1)), running_var.dtype)),
                         momentum)


def _running_invstd(running_mean, running_var, eps, dtype):
    """Eval mode normalises with the running statistics: their mean and 1 / sqrt(var + eps)."""
    return _as_dtype(running_mean, dtype), torch.rsqrt(_as_dtype(running_var, dtype) + eps)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, ops, group):
        count = None
        if training:
            mean, var, invstd, count = _batch_statistics(ops, x, eps, group)
            if running_mean is not None:
                _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        else:
            mean, invstd = _running_invstd(running_mean, running_var, eps, weight.dtype)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.training, ctx.count, ctx.ops, ctx.group = training, count, ops, group
        return ops.forward(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        sum_g, sum_gx = ctx.ops.backward_reduce(grad_out, x, mean, invstd, weight, bias)
        if ctx.training:
            mean_g, mean_gx = _grad_means(sum_g, sum_gx, ctx.count, ctx.group)
        else:  # the statistics are constants
            mean_g = mean_gx = torch.zeros_like(sum_g)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.ops.backward_elemt(grad_out, x, mean, invstd, weight, bias, mean_g, mean_gx)
        return grad_x, sum_gx, sum_g, None, None, None, None, None, None, None


class _BNReLUSkip(torch.autograd.Function):
    """Native training BN-ReLU of an x that also feeds a residual block's other branch:
    (y, mean, var, x), x passed through, so that the branch's gradient comes back here and is
    added to grad_x in the backward's elementwise pass (fasthg::bn_relu_train_backward_skip)
    rather than by autograd in a pass over three tensors of its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var, invstd = torch.ops.fasthg.bn_relu_train_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var, x

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, grad_skip):
        if grad_y is None:
            return grad_skip, None, None, None
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad_x, sum_g, sum_gx = _train_backward(grad_y, x, mean, invstd, weight, bias, grad_skip)
        return grad_x, sum_gx, sum_g, None


def bn_relu_with_skip(x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
                      momentum=0.1, eps=1e-5, backend="auto", sync=False, process_group=None):
    """(bn_relu(x, ...), skip) for an x that a residual block also feeds to its identity (or
    projection) branch, which should take `skip` instead: skip is x (the same values, a view),
    but in native training its gradient is added to grad_x in bn_relu's own backward pass
    instead of by autograd in a pass over three tensors of its own. Elsewhere skip is x itself."""
    check_args(x, weight, bias, running_mean, running_var, training)
    fused = (training and not sync and x.requires_grad and torch.is_grad_enabled() and "native" in _OPS
             and x.device.type in _OPS["native"].train_devices and _backend.resolve(backend, "bn_relu", x) == "native")
    if not fused:
        return bn_relu(x, weight, bias, running_mean, running_var, training, momentum, eps, backend, sync,
                       process_group), x
    c = x.shape[1]
    weight, bias = _affine(x, weight, bias)
    y, mean, var, skip = _BNReLUSkip.apply(x, weight, bias, float(eps))
    if running_mean is not None:
        _update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
    return y, skip


def _check_out(out, x, weight, bias, training):
    if training:
        raise ValueError("bn_relu: `out` is for inference (training=False)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, out)):
        raise ValueError("bn_relu: `out` has no autograd; with tensors that require grad, leave out=None")
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        got = f"{tuple(out.shape)}, {out.dtype}, {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"bn_relu: `out` must match `x` ({tuple(x.shape)}, {x.dtype}, {x.device}), got {got}")
    fmt = memory_format_of(x)
    if not out.is_contiguous(memory_format=fmt):
        raise ValueError(f"bn_relu: `out` must be dense in `x`'s memory format ({fmt}), got strides {out.stride()}")
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError("bn_relu: `out` must not share memory with `x`")


def _sync_group(sync, process_group):
    """The process group to merge statistics over, or None when there is nothing to merge."""
    if not sync:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("bn_relu: sync=True needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group)")
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def batch_norm_args(bn):
    """(running_mean, running_var, use_batch_stats, momentum factor) for the forward of an
    nn.BatchNorm2d `bn`, decided exactly as nn.BatchNorm2d does; counts the batch in
    num_batches_tracked when training (call once per forward)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (bn.running_mean if track else None), (bn.running_var if track else None), use_batch_stats, factor


def _check_sums(sums, x):
    if sums is None:
        return
    if not (isinstance(sums, (tuple, list)) and len(sums) == 2 and all(isinstance(t, torch.Tensor) for t in sums)):
        raise ValueError(f"bn_relu: `sums` must be a pair of tensors (sum, sum of squares), got {type(sums).__name__}")
    c, p = x.shape[1], _param_dtype(x)
    for t in sums:
        if t.shape != (c,) or t.dtype != p or t.device != x.device:
            raise ValueError(f"bn_relu: `sums` must be two ({c},) {p} tensors on {x.device} (x's channels), got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")


def _takes_sums(which, x, sums):
    """Whether a training BN-ReLU takes its statistics from x's sums: given, and the native CPU
    kernels (fasthg::bn_relu_train_sums, bn_relu_train_forward_sums)."""
    return sums is not None and which == "native" and x.device.type == "cpu"


def bn_relu(x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
            momentum=0.1, eps=1e-5, backend="auto", sync=False, process_group=None, out=None, sums=None):
    """relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)),
    fused. weight/bias None mean affine=False; running stats None mean batch statistics only.
    `momentum` is the weight of the new batch in the running average (as in F.batch_norm).
    sync=True (training only) merges the statistics over `process_group` (default: all
    processes) so that every process normalises with those of the whole global batch.
    out (inference only: eval mode, no gradient): a tensor like x, dense in x's memory format
    and apart from x, that the result is written into (and returned) instead of a new one.
    sums (training): x's per-channel (sum, sum of squares), float32 (float64 for float64 x),
    as fasthg.ops.bn_relu_conv1x1(out_stats=True) gives them with x: native CPU training
    without sync takes the batch statistics from them (mean, and E[x^2] - mean^2 in double;
    a pass over x where that cancels) instead of a pass over x. They must be x's own: the
    other backends and paths compute their own and ignore them."""
    check_args(x, weight, bias, running_mean, running_var, training)
    _check_sums(sums, x)
    if out is not None:
        _check_out(out, x, weight, bias, training)
    which = _backend.resolve(backend, "bn_relu", x)
    group = _sync_group(sync, process_group) if training else None
    if which == "eager" and group is None:
        y = reference.bn_relu(x, weight, bias, running_mean, running_var, training, momentum, eps)
        return y if out is None else out.copy_(y)
    c = x.shape[1]
    weight, bias = _affine(x, weight, bias)
    ops = _OPS[which]
    if training and group is None and x.device.type in ops.train_devices:
        if _takes_sums(which, x, sums):
            y, mean, var = torch.ops.fasthg.bn_relu_train_sums(x, sums[0], sums[1], weight, bias, float(eps))
        else:
            y, mean, var = ops.train(x, weight, bias, float(eps))
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, x.numel() // c, momentum)
        return y
    if not training and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
        # inference: one elementwise op, without an autograd Function around it
        stats = _running_invstd(running_mean, running_var, eps, weight.dtype)
        if out is None:
            return ops.forward(x, *stats, weight, bias)
        ops.forward_into(x, *stats, weight, bias, out)
        return out
    return _BNReLU.apply(x, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps),
                         ops, group)


# Bytes moved, in full tensors: the training forward reads x for the statistics, then reads x
# and writes y; its backward reads grad and x to reduce, then grad and x again to write grad_x;
# eval reads x and writes y.
OP = registry.register(registry.FusedOp(
    name="bn_relu", kernel="bn_relu_forward",
    schemas=("bn_relu_stats", "bn_relu_forward", "bn_relu_forward_into", "bn_relu_backward_reduce",
             "bn_relu_backward_elemt", "bn_relu_train_forward", "bn_relu_train_backward",
             "bn_relu_train_backward_skip", "bn_relu_train", "bn_relu_train_forward_sums", "bn_relu_train_sums"),
    reference=reference.bn_relu, fn=bn_relu,
    traffic={"train forward": 3.0, "eval forward": 2.0, "train forward+backward": 8.0},
    bars={"train forward+backward": 1.6}))
