"""bn_relu_conv: conv(relu(bn(x))) for training without storing relu(bn(x)).

A pre-activation residual body stores, per BN-ReLU-conv unit, the BN's input x (for the BN
backward) and the normalised activation y = relu(bn(x)) (for the convolution's weight
gradient). Here autograd saves only x and the per-channel statistics (mean, invstd): the
forward runs the fused BN-ReLU and the convolution and frees y; the backward recomputes y
in one fused pass (bn_relu_forward with the saved statistics), runs the convolution's
backward (fasthg.ops.conv2d.backward: ATen's, the weight gradient on AMX where that runs), then the fused BN-ReLU backward, which recomputes the
ReLU mask from x and the statistics itself. One extra elementwise pass per unit in the
backward buys half the unit's saved activations (2C instead of 4C per pixel in a bottleneck).

Not a registered fused op (it has no kernels of its own): it composes fasthg.ops.bn_relu's
kernels with the stock convolution. Backends as bn_relu's: native and triton recompute;
eager stores (relu(batch_norm(x)) then the convolution, as plain PyTorch does). Eval mode and
inference store nothing anyway and run the fused eval BN-ReLU, then the convolution.

Autocast: the convolution runs in the autocast dtype, as nn.Conv2d would (the BN-ReLU in x's
dtype, as fasthg.ops.bn_relu does), so results match the storing model's. Sync BN
(BNReLU.sync): statistics are merged across processes in the forward and the backward's two
sums all-reduced, with fasthg.ops.bn_relu's helpers.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fasthg.ops import _backend
from fasthg.ops import conv1x1 as _conv1x1
from fasthg.ops.conv1x1 import bn_relu_conv1x1, bn_relu_conv1x1_with_skip
from fasthg.ops.conv2d import backward as conv_backward
from fasthg.ops.conv2d import forward as conv_forward
from fasthg.ops.conv2d import compute_dtype  # (relu(bn(x)) has x's dtype)
from fasthg.ops.bn_relu import (_OPS, _affine, _as_dtype, _batch_statistics, _grad_means, _sync_group,
                                 _takes_sums, _train_backward, _update_running_stats, batch_norm_args, bn_relu,
                                 check_args)


def check_modules(bn, conv):
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"bn_relu_conv: `bn` must be an nn.BatchNorm2d (or fasthg.nn.BNReLU), got {type(bn).__name__}")
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"bn_relu_conv: `conv` must be an nn.Conv2d, got {type(conv).__name__}")
    why = None
    if conv.groups != 1:
        why = f"groups={conv.groups} (only 1 is supported)"
    elif isinstance(conv.padding, str):
        why = f"padding={conv.padding!r} (give the padding as numbers)"
    elif conv.padding_mode != "zeros":
        why = f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    elif conv.in_channels != bn.num_features:
        why = f"in_channels={conv.in_channels} but the BN has {bn.num_features} features"
    if why:
        raise ValueError(f"bn_relu_conv: unsupported convolution {conv}: {why}")


class _BNReLUConvRecompute(torch.autograd.Function):
    """Training only. Inputs after x: the BN's weight and bias (in the statistics' dtype), its
    running statistics (None: not tracked), constants, each convolution's (stride, padding,
    dilation), `tee`, the dtype the convolutions compute in, then each convolution's weight and
    bias as the module holds them (bias may be None): cast here, so that their gradients come
    back in their own dtype from fasthg.ops.conv2d.backward (under autocast float32 straight
    from the AMX kernel, as fasthg.ops.conv2d's). One output per convolution, all from the same
    relu(bn(x)); with tee, x as well (for a residual block's skip branch, whose gradient then
    joins the BN-ReLU's backward pass: fasthg::bn_relu_train_backward_skip). `sums`: x's
    per-channel sums for the statistics (fasthg.ops.bn_relu's), or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, which, group, geometry, tee,
                sums, dtype, *conv_params):
        ops = _OPS[which]
        if group is None and x.device.type in ops.train_devices:
            if _takes_sums(which, x, sums):
                y, mean, var, invstd = torch.ops.fasthg.bn_relu_train_forward_sums(x, *sums, weight, bias, eps)
            else:
                y, mean, var, invstd = torch.ops.fasthg.bn_relu_train_forward(x, weight, bias, eps)
            count = x.numel() // x.shape[1]
        else:
            mean, var, invstd, count = _batch_statistics(ops, x, eps, group)
            y = ops.forward(x, mean, invstd, weight, bias)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        weights = [w.to(dtype) for w in conv_params[0::2]]
        biases = [None if b is None else b.to(dtype) for b in conv_params[1::2]]
        ctx.param_dtypes = tuple(w.dtype for w in conv_params[0::2])
        y = y.to(dtype)
        outs = tuple(conv_forward(y, w, b, *g, 1) for w, b, g in zip(weights, biases, geometry))
        # y dies here: only x and the statistics (and the parameters) are kept.
        ctx.save_for_backward(x, weight, bias, mean, invstd, *weights)
        ctx.which, ctx.group, ctx.count, ctx.geometry = which, group, count, geometry
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.tee = tee
        ctx.set_materialize_grads(False)  # an output nobody used costs no convolution backward
        if tee:
            return outs + (x,)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grad_outs):
        grad_skip = None
        if ctx.tee:
            *grad_outs, grad_skip = grad_outs
        x, weight, bias, mean, invstd, *weights = ctx.saved_tensors
        ops = _OPS[ctx.which]
        need = ctx.needs_input_grad
        need_y = need[0] or need[1] or need[2]
        y = ops.forward(x, mean, invstd, weight, bias).to(weights[0].dtype)  # the recompute
        grad_y, grad_params = None, []
        for k, (g, w, geo, has_bias) in enumerate(zip(grad_outs, weights, ctx.geometry, ctx.has_bias)):
            need_w, need_b = need[13 + 2 * k], need[14 + 2 * k]
            if g is None:
                grad_params += [None, None]
                continue
            gy, gw, gb = conv_backward(g, y, w, has_bias, *geo, 1, [need_y, need_w, need_b], ctx.param_dtypes[k])
            grad_params += [gw, gb]
            if gy is not None:
                grad_y = gy if grad_y is None else grad_y + gy
        del y
        grad_x, grad_w, grad_b = grad_skip, None, None
        if grad_y is not None:
            grad_y = grad_y.to(x.dtype)
            if ctx.group is None and x.device.type in ops.train_devices:
                grad_x, grad_b, grad_w = _train_backward(grad_y, x, mean, invstd, weight, bias, grad_skip)
            else:
                grad_b, grad_w = ops.backward_reduce(grad_y, x, mean, invstd, weight, bias)
                mean_g, mean_gx = _grad_means(grad_b, grad_w, ctx.count, ctx.group)
                if need[0]:
                    grad_x = ops.backward_elemt(grad_y, x, mean, invstd, weight, bias, mean_g, mean_gx)
                    if grad_skip is not None:
                        grad_x = grad_x + grad_skip
        return (grad_x, grad_w, grad_b) + (None,) * 10 + tuple(grad_params)


def _training_bn(x, bn):
    """The BN's running statistics (or None), momentum factor, and its weight and bias in the
    statistics' dtype (ones and zeros where it has none), checked against x for training."""
    rm, rv, _, factor = batch_norm_args(bn)  # (training: batch statistics)
    check_args(x, bn.weight, bn.bias, rm, rv, True)
    return (rm, rv, factor) + _affine(x, bn.weight, bn.bias)


def _recompute(which, x, bn, convs, group, tee=False, sums=None):
    """The recomputing unit on backend `which` (native or triton); with tee, x as well (as
    _BNReLUConvRecompute returns it) after the convolutions' outputs."""
    rm, rv, factor, weight, bias = _training_bn(x, bn)
    cdtype = compute_dtype(x)
    params = []
    for conv in convs:
        if conv.weight.dtype != cdtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"bn_relu_conv: `x` is {x.dtype} but the convolution's weight is {conv.weight.dtype} "
                             "(use autocast, or convert the model)")
        params += [conv.weight, conv.bias]
    geometry = tuple((tuple(m.stride), tuple(m.padding), tuple(m.dilation)) for m in convs)
    out = _BNReLUConvRecompute.apply(x, weight, bias, rm, rv, float(factor), float(bn.eps), which, group, geometry,
                                     tee, sums, cdtype, *params)
    return out if len(convs) > 1 or tee else (out,)


def _stored(backend, x, bn, convs, group, sums=None):
    """The storing composition: fused (or eager) BN-ReLU, then the convolutions."""
    rm, rv, batch_stats, factor = batch_norm_args(bn)
    y = bn_relu(x, bn.weight, bn.bias, rm, rv, batch_stats, factor, bn.eps, backend=backend,
                sync=group is not None, process_group=group, sums=sums)
    return tuple(conv(y) for conv in convs)


def _is_pointwise(conv):
    return tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (0, 0)


def _fused_conv1x1(which, x, bn, convs, group, tee=False, sums=None, out_stats=False):
    """The fused unit for 1x1 convolutions, fasthg.ops.bn_relu_conv1x1 on backend `which`
    (native: the CPU's kernels; triton): relu(bn(x)) is formed as the GEMM reads it, and its
    backward recomputes it from x and the statistics, so it is never stored. The statistics
    come from one pass over x (given `sums` are not used here); their gradient terms are the
    kernel's BN training backward (linear in the output gradient, so several convolutions
    sum). With tee (one convolution), (out, skip) as _recompute's:
    bn_relu_conv1x1_with_skip; with out_stats too, ((out, (sum, sum_sq)), skip)."""
    rm, rv, factor, weight, bias = _training_bn(x, bn)
    with torch.no_grad():
        mean, var = _OPS[which].stats(x)
        if rm is not None:
            _update_running_stats(rm, rv, mean, var, x.numel() // x.shape[1], float(factor))
        invstd = torch.rsqrt(var + bn.eps)
    # The bias as autocast gives it to nn.Conv2d (rounded to its dtype), through a
    # differentiable cast; the weight as the module holds it: bn_relu_conv1x1 casts it to x's
    # dtype (the native kernels inside, a float32 weight's gradient then in float32).
    cdtype = compute_dtype(x)
    unit = bn_relu_conv1x1_with_skip if tee else bn_relu_conv1x1
    outs = tuple(unit(x, mean, invstd, weight, bias, conv.weight,
                      None if conv.bias is None else _as_dtype(conv.bias, cdtype), training=True,
                      out_stats=out_stats, backend=which)
                 for conv in convs)
    if out_stats:  # (tee: one convolution)
        (y, s, s2), skip = outs[0]
        return (y, (s, s2)), skip
    return outs[0] if tee else outs


def _fuses_conv1x1(which, x, convs, group, with_skip=False) -> bool:
    """Whether backend `which` runs these convolutions in bn_relu_conv1x1: every one 1x1 and
    in x's dtype (or autocast's, where that is x's: the unit casts the weight, as autocast
    would), the BN not synced (the kernels' backward reduces over the local batch only); on
    the CPU, one convolution, x channels_last (the kernels' layout: NCHW would cost a
    conversion each way) in one of fasthg.ops.conv1x1.cpu_unit_dtypes(with_skip) (with_skip:
    x also feeds a residual branch, bn_relu_conv_with_skip), and the native unit built; Triton
    where it runs."""
    if which == "native":
        # one convolution per unit (several would each recompute the activation and run the
        # BN's backward), in the dtypes where the unit pays (cpu_unit_dtypes)
        if not (x.device.type == "cpu" and len(convs) == 1 and x.dtype in _conv1x1.cpu_unit_dtypes(with_skip)
                and _conv1x1.native_available() and x.is_contiguous(memory_format=torch.channels_last)):
            return False
    elif which != "triton" or not all(conv.weight.dtype == x.dtype for conv in convs):
        return False
    if group is not None or compute_dtype(x) != x.dtype:
        return False
    return all(_is_pointwise(conv) and (conv.weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type))
               for conv in convs)


def _unit(which, x, bn, convs, group, with_skip=False):
    """The implementation that runs the training unit on concrete backend `which`: the one
    place where a backend picks its kernels. 1x1 convolutions go to the fused unit where
    _fuses_conv1x1 says so; the rest recomputes around the stock convolution."""
    if which == "eager":
        return _stored
    if _fuses_conv1x1(which, x, convs, group, with_skip):
        return _fused_conv1x1
    return _recompute


def fuses_conv1x1(x, bn, conv, backend="auto", with_skip=False) -> bool:
    """Whether bn_relu_conv(x, bn, conv, backend) (with_skip: bn_relu_conv_with_skip) runs
    bn_relu_conv1x1's fused kernels in training (the models use it to route their 1x1 units
    there in either memory mode)."""
    if not (bn.training and torch.is_grad_enabled()) or getattr(bn, "sync", False):
        return False
    return _fuses_conv1x1(_backend.resolve(backend, "bn_relu", x), x, (conv,), None, with_skip)


def _checked(x, bn, convs, backend):
    """The concrete backend and the process group (or None) for bn_relu_convs' arguments,
    after the checks every entry gives."""
    if not convs:
        raise ValueError("bn_relu_convs: `convs` must name at least one convolution")
    for conv in convs:
        check_modules(bn, conv)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != bn.num_features:
        raise ValueError(f"bn_relu_conv: `x` must be [N, {bn.num_features}, H, W] for {bn}, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    which = _backend.resolve(backend, "bn_relu", x)
    group = None
    if bn.training and getattr(bn, "sync", False):
        group = _sync_group(True, getattr(bn, "process_group", None))
    return which, group


def bn_relu_convs(x, bn, convs, backend="auto", sums=None):
    """(conv(relu(bn(x))) for conv in convs): several convolutions reading one BN-ReLU's output
    (each as bn_relu_conv requires), which the recomputing unit does not store either."""
    which, group = _checked(x, bn, convs, backend)
    if not (bn.training and torch.is_grad_enabled()):  # nothing is saved for backward
        return _stored(which, x, bn, convs, group, sums)
    return _unit(which, x, bn, convs, group)(which, x, bn, convs, group, sums=sums)


# The dtypes whose unit outputs' sums feed the next BN-ReLU (out_stats): their own rounding
# (2^-8, 2^-11) dwarfs what the float32 sums cost its statistics; float32 keeps eager's
# double-summed statistics.
_SUMS_DTYPES = (torch.bfloat16, torch.float16)


def bn_relu_conv_with_skip(x, bn, conv, backend="auto", out_stats=False):
    """(bn_relu_conv(x, bn, conv, backend), skip) for an x that a residual block also feeds to
    its skip branch, which should take `skip` instead: x's values (a view), whose gradient the
    training unit adds in its own backward: the recomputing unit's BN-ReLU backward pass
    (fasthg.ops.bn_relu_with_skip's, for this unit), the fused 1x1 unit's grad_x pass. Where
    nothing is saved for backward, or eager runs, skip is x. out_stats=True makes the first
    result (out, sums): where the native fused 1x1 unit runs in bfloat16 or float16, sums is
    out's per-channel (sum, sum of squares) from its epilogue, for the next BN-ReLU's
    statistics (fasthg.ops.bn_relu's `sums`, bn_relu_conv's); else None."""
    which, group = _checked(x, bn, (conv,), backend)
    impl = _unit(which, x, bn, (conv,), group, with_skip=True)
    if not (x.requires_grad and bn.training and torch.is_grad_enabled()) or impl is _stored:
        out = bn_relu_conv(x, bn, conv, backend)
        return ((out, None) if out_stats else out), x
    if not out_stats:
        return impl(which, x, bn, (conv,), group, tee=True)
    if impl is _fused_conv1x1 and which == "native" and x.dtype in _SUMS_DTYPES:
        return impl(which, x, bn, (conv,), group, tee=True, out_stats=True)
    out, skip = impl(which, x, bn, (conv,), group, tee=True)
    return (out, None), skip


def bn_relu_conv(x, bn, conv, backend="auto", sums=None):
    """conv(relu(bn(x))), `bn` an nn.BatchNorm2d (fasthg.nn.BNReLU included: its sync and
    process_group apply) and `conv` an nn.Conv2d (groups 1, numeric padding, zero padding mode),
    following bn.training exactly as fasthg.nn.BNReLU does. In training, the native and triton
    backends save only x and the BN statistics for backward and recompute relu(bn(x)) there;
    eager stores it (plain composition). The modules' own parameters and buffers are used.
    sums: x's per-channel (sum, sum of squares) from the op that wrote x, for the BN's batch
    statistics where a native CPU BN-ReLU computes them (fasthg.ops.bn_relu's `sums`)."""
    return bn_relu_convs(x, bn, (conv,), backend, sums)[0]


__all__ = ["bn_relu_conv", "bn_relu_conv_with_skip", "bn_relu_convs", "check_modules", "fuses_conv1x1"]
