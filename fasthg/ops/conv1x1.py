"""bn_relu_conv1x1: a 1x1 convolution whose input is relu(batch_norm(x)), the normalised
activation formed as the GEMM reads it and never stored, and the output's per-channel sum and
sum of squares (what the next BatchNorm needs) taken in its epilogue. Backward recomputes the
activation from x and the statistics.

Two backends: native (CPU, csrc/cpu/conv1x1.cpp: tiles of pixels normalised into an
L2-sized buffer, its own register-tiled GEMM, csrc/cpu/gemm_panels.h) and triton
(kernels/conv1x1.py: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). Not a registry
op (the registry's ops have kernels on every backend); Triton's ahead-of-time compile list is
in registry.TRITON_ONLY_KERNELS, the native schemas in registry.UNREGISTERED_SCHEMAS. The ops
are torch.library custom ops with autograd and fake implementations, so they trace under
torch.compile (torch.library.opcheck tests them).
"""
import os

import torch

from fasthg.device import cpu_computes_bf16
from fasthg.ops import _backend, _ext
from fasthg.ops.layout import memory_format_of

BACKENDS = ("auto", "native", "triton")
_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _param_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _describe(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_args(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias):
    def fail(msg):
        raise ValueError(f"bn_relu_conv1x1: {msg}")

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        fail(f"`x` must be a 4-D [N, C, H, W] tensor, got {_describe(x)}")
    if x.dtype not in _ACTIVATION_DTYPES:
        fail(f"`x` must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.numel() == 0:
        fail(f"`x` must not be empty, got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("mean", mean), ("invstd", invstd), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (c,):
            fail(f"`{name}` must be a tensor of shape ({c},) for the {c} channels of `x`, got {_describe(t)}")
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 4 or tuple(conv_weight.shape[1:]) != (c, 1, 1):
        fail(f"`conv_weight` must be a [Cout, {c}, 1, 1] tensor (a 1x1 convolution of the {c} channels of `x`), "
             f"got {_describe(conv_weight)}")
    cout = conv_weight.shape[0]
    if cout == 0:
        fail("`conv_weight` must have at least one output channel")
    if conv_bias is not None and (not isinstance(conv_bias, torch.Tensor) or conv_bias.shape != (cout,)):
        fail(f"`conv_bias` must be None or a tensor of shape ({cout},) for the {cout} output channels of "
             f"`conv_weight`, got {_describe(conv_bias)}")
    named = (("mean", mean), ("invstd", invstd), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
             ("conv_weight", conv_weight), ("conv_bias", conv_bias))
    for name, t in named:
        if t is None:
            continue
        if not t.is_floating_point():
            fail(f"`{name}` must be floating point, got {t.dtype}")
        if t.device != x.device:
            fail(f"`{name}` must be on {x.device} like `x`, got {t.device}")


def native_available(device_type: str = "cpu") -> bool:
    """Whether the native CPU unit is built (fasthg._C) for tensors on `device_type`."""
    return device_type == "cpu" and _ext.LOAD_ERROR is None and hasattr(torch.ops.fasthg, "bn_relu_conv1x1_forward")


def native_gemm_kernel(dtype: torch.dtype, cin: int, cout: int) -> str:
    """The GEMM kernel the native CPU unit runs for a dtype and channel counts: "amx" (bfloat16
    with both counts even, on AMX CPUs: oneDNN's brgemm), else the FMA kernel fasthg.ops'
    extension picked for the CPU ("avx512", "avx2" or "plain")."""
    kernel = torch.ops.fasthg.cpu_gemm_kernel(dtype)
    if kernel == "amx" and (cin % 2 or cout % 2):
        return torch.ops.fasthg.cpu_gemm_kernel(torch.float32)
    return kernel


CPU_UNIT_CHOICES = ("auto", "all", "off")
_CPU_COMPUTES_BF16 = cpu_computes_bf16()  # probed once, not inside a graph torch.compile traces


def cpu_unit_dtypes(with_skip: bool = False) -> tuple:
    """The activation dtypes whose 1x1 BN-ReLU-conv units training runs in the native CPU unit
    (fasthg.ops.fuses_conv1x1), by FASTHG_CPU_CONV1X1: "auto" (the default) where it was
    measured to win: bfloat16 and float16 on CPUs without bfloat16 instructions, whose oneDNN
    convolutions convert to float32 and run 1.3-3.6x slower than the unit (benchmarks/results/
    HISTORY.md). On AMX or AVX512_BF16 CPUs oneDNN computes bfloat16 natively; there the unit's
    bfloat16 GEMMs run on AMX too (native_gemm_kernel), and it wins (bfloat16 and float32) where
    its input also feeds a residual branch (with_skip: a residual module's first unit, whose
    skip gradient it adds in its own grad_x pass); a unit without one (the module's last, whose
    residual add oneDNN's convolution fuses and the unit does not) is at parity in the hg2 step
    and is not routed. "all": every dtype, every unit; "off": none."""
    choice = os.environ.get("FASTHG_CPU_CONV1X1", "auto")
    if choice not in CPU_UNIT_CHOICES:
        raise ValueError(f"FASTHG_CPU_CONV1X1 must be one of {CPU_UNIT_CHOICES}, got {choice!r}")
    if choice == "off":
        return ()
    if choice == "all":
        return (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if _CPU_COMPUTES_BF16:
        return (torch.float32, torch.bfloat16) if with_skip else ()
    return (torch.float16, torch.bfloat16)


def resolve(backend: str, x) -> str:
    """The backend that runs the unit for x: native on the CPU where it is built, else Triton."""
    if backend not in BACKENDS:
        raise ValueError(f"bn_relu_conv1x1: `backend` must be one of {BACKENDS}, got {backend!r}")
    dev = x.device.type
    if backend == "auto":
        backend = "native" if native_available(dev) else "triton"
    if backend == "native" and not native_available(dev):
        why = "the extension is not built" if dev == "cpu" else "its kernels are CPU kernels (Triton runs CUDA tensors)"
        raise ValueError(f"bn_relu_conv1x1: backend='native' cannot run on {dev} tensors: {why}")
    if backend == "triton":
        if not _backend.triton_usable(dev):
            raise ValueError(f"bn_relu_conv1x1: runs on Triton, which needs CUDA tensors (or CPU tensors under "
                             f"TRITON_INTERPRET=1); `x` is on {x.device}"
                             + ("" if _backend.triton_available() else " and triton is not installed"))
        if x.dtype == torch.bfloat16 and dev != "cuda":
            raise ValueError("bn_relu_conv1x1: bfloat16 `x` needs a CUDA device (the Triton interpreter has no bfloat16)")
    return backend


def _fake_forward(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training, out_stats):
    n, _, h, w = x.shape
    cout = conv_weight.shape[0]
    y = x.new_empty((n, cout, h, w)).contiguous(memory_format=memory_format_of(x))
    k = cout if out_stats else 0
    return y, x.new_empty(k, dtype=_param_dtype(x)), x.new_empty(k, dtype=_param_dtype(x))


def _fake_backward(grad_y, x, mean, invstd, bn_weight, bn_bias, conv_weight, training, grad_skip=None):
    p = _param_dtype(x)
    c, cout = x.shape[1], conv_weight.shape[0]
    return (torch.empty_like(x, memory_format=memory_format_of(x)), x.new_empty(c, dtype=p), x.new_empty(c, dtype=p),
            conv_weight.new_empty((cout, c, 1, 1)), x.new_empty(cout, dtype=p))


def _setup_context(ctx, inputs, output):
    x, mean, invstd, bn_weight, bn_bias, conv_weight, _, training, _ = inputs
    ctx.save_for_backward(x, mean, invstd, bn_weight, bn_bias, conv_weight)
    ctx.training = training
    # The statistics carry no gradient: a training BN that uses them differentiates through
    # its statistics itself (its backward's mean terms), from y.
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_of(backward_op):
    """The autograd backward of a forward op whose backward op is `backward_op` (Triton's; the
    native op's autograd is csrc/autograd/conv1x1.cpp)."""
    def backward(ctx, grad_y, _grad_sum, _grad_sumsq):
        x, mean, invstd, bn_weight, bn_bias, conv_weight = ctx.saved_tensors
        dx, dbw, dbb, dw, db = backward_op(grad_y, x, mean, invstd, bn_weight, bn_bias, conv_weight, ctx.training)
        return dx, None, None, dbw, dbb, dw, db, None, None

    return backward


_forward_op = _backward_op = None
if _backend.triton_available():
    from fasthg.kernels import conv1x1 as _tk

    @torch.library.custom_op("fasthg::bn_relu_conv1x1_triton", mutates_args=())
    def _forward_op(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, bn_weight: torch.Tensor,
                    bn_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor, training: bool,
                    out_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.forward(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, out_stats)

    @torch.library.custom_op("fasthg::bn_relu_conv1x1_backward_triton", mutates_args=())
    def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                     bn_weight: torch.Tensor, bn_bias: torch.Tensor, conv_weight: torch.Tensor,
                     training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.backward(grad_y, x, mean, invstd, bn_weight, bn_bias, conv_weight, training)

    _forward_op.register_fake(_fake_forward)
    _backward_op.register_fake(_fake_backward)
    _forward_op.register_autograd(_backward_of(_backward_op), setup_context=_setup_context)

# The native ops' schemas are csrc/ops.cpp's, their CPU kernels csrc/cpu/conv1x1.cpp and their
# autograd csrc/autograd/conv1x1.cpp (the same as _setup_context and _backward_of, in C++).
_native_forward_op = _native_backward_op = None
if native_available():
    _native_forward_op = torch.ops.fasthg.bn_relu_conv1x1_forward.default
    _native_backward_op = torch.ops.fasthg.bn_relu_conv1x1_backward.default
    torch.library.register_fake("fasthg::bn_relu_conv1x1_forward", _fake_forward)
    torch.library.register_fake("fasthg::bn_relu_conv1x1_backward", _fake_backward)

_OPS = {"native": lambda: _native_forward_op, "triton": lambda: _forward_op}


class _WithSkip(torch.autograd.Function):
    """The unit on backend `which`, with x passed through as a fourth output, `skip`, for a
    residual branch that also takes x: that branch's gradient comes back here and joins grad_x
    in the unit's backward (the native kernels add it in their grad_x pass), where autograd
    would add it in a pass over three tensors of its own."""

    @staticmethod
    def forward(ctx, x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training, out_stats, which):
        inputs = (x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training, out_stats)
        out = _OPS[which]()(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.which = which
        ctx.set_materialize_grads(False)
        return (*out, x)

    @staticmethod
    def backward(ctx, grad_y, _grad_sum, _grad_sumsq, grad_skip):
        if grad_y is None:
            return (grad_skip,) + (None,) * 9
        args = (grad_y,) + ctx.saved_tensors + (ctx.training,)
        if ctx.which == "native":
            dx, dbw, dbb, dw, db = _native_backward_op(*args, grad_skip)
        else:
            dx, dbw, dbb, dw, db = _backward_op(*args)
            dx = dx if grad_skip is None else dx + grad_skip
        return dx, None, None, dbw, dbb, dw, db, None, None, None


def bn_relu_conv1x1(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training=True, out_stats=False,
                    backend="auto"):
    """y = conv2d(relu((x - mean) * invstd * bn_weight + bn_bias), conv_weight, conv_bias) for a 1x1
    conv_weight [Cout, C, 1, 1] (conv_bias None or [Cout]), in x's memory format and dtype.

    Differentiable in x, bn_weight, bn_bias, conv_weight and conv_bias. With training=True,
    mean and invstd must be x's batch statistics (mean and 1/sqrt(biased var + eps)) and the
    backward is BatchNorm's training backward (the gradient flows through them into x); with
    training=False they are constants (running statistics). out_stats=True also returns y's
    per-channel sum and sum of squares, float32 (float64 for float64 x), without gradient:
    (y, sum, sum_of_squares).

    x: float32, float16, bfloat16 (not in the Triton interpreter) or float64; the statistics and
    BN parameters are used in float32 (float64 for float64 x), and the convolution runs in x's
    dtype with float32 accumulation (conv_weight is cast to x's dtype, as autocast does; the
    native kernels round relu(bn(x)) to x's dtype first, as a stored activation would be). The
    native kernels take a conv_weight in the statistics' dtype (float32 for float16 and bfloat16
    x) as it is, cast it inside and return its gradient in that dtype from their float sums,
    not rounded to x's dtype and cast back. NCHW x is
    copied to channels_last for the kernels (and y back to NCHW).

    backend: "native" (CPU tensors; float32, float16, bfloat16 and float64, computed in float32
    or float64; bfloat16's GEMMs on AMX where the CPU has it, with float32 accumulation),
    "triton" (CUDA tensors, or CPU ones under TRITON_INTERPRET=1), or "auto" (native on the CPU
    where the extension is built, else Triton)."""
    which, args = _prepared(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, backend)
    y, s, s2 = _OPS[which]()(*args, bool(training), bool(out_stats))
    return (y, s, s2) if out_stats else y


def _prepared(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, backend):
    """The backend and the ops' tensor arguments, checked, in the dtypes the ops take."""
    check_args(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias)
    which = resolve(backend, x)
    p = _param_dtype(x)
    cout = conv_weight.shape[0]
    bias = x.new_zeros(cout, dtype=p) if conv_bias is None else conv_bias.to(p)
    weight = conv_weight if which == "native" and conv_weight.dtype == p else conv_weight.to(x.dtype)
    return which, (x, mean.to(p), invstd.to(p), bn_weight.to(p), bn_bias.to(p), weight, bias)


def bn_relu_conv1x1_with_skip(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, training=True,
                              out_stats=False, backend="auto"):
    """(bn_relu_conv1x1(x, ...), skip) for an x that a residual block also feeds to its other
    branch, which should take `skip` instead: skip has x's values, and its gradient is added to
    grad_x in the unit's own backward (on the native AMX path in its grad_x pass) rather than by
    autograd in a pass of its own. Arguments and the first result as bn_relu_conv1x1's."""
    which, args = _prepared(x, mean, invstd, bn_weight, bn_bias, conv_weight, conv_bias, backend)
    y, s, s2, skip = _WithSkip.apply(*args, bool(training), bool(out_stats), which)
    return ((y, s, s2) if out_stats else y), skip
