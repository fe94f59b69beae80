"""Folded inference: each BatchNorm that directly follows a convolution is folded into that
convolution's weight and bias, and its ReLU runs as the convolution's post-op. The other
convolutions run the same kernels without a ReLU (pre-packed weights), and a residual
module's last convolution adds the skip as its post-op.

    w' = w * g,  b' = (b - mean) * g + beta,  g = gamma / sqrt(var + eps)

Which kernel runs a folded conv (FoldedConvReLU.forward), per call:
- CPU, channels_last input, oneDNN available: `mkldnn._convolution_pointwise` with the ReLU
  (or, `.binary`, the skip's add) as its post-op and the weight pre-packed by
  `mkldnn._reorder_convolution_weight` (what inductor's freezing does), packed once per
  input shape and dtype. NCHW inputs take the
  plain path: the packed op writes channels_last whatever the input, and the output keeps
  the input's memory format.
- CUDA: cuDNN's conv+bias+ReLU (`torch.cudnn_convolution_relu`); cuDNN's conv for the rest.
- Elsewhere, and whenever the model is traced (torch.export, torch.compile): conv2d then
  ReLU in place. Tracing cannot take the packed weight (an opaque MKLDNN tensor: no
  strides, no fake tensor for it), so the exported graph holds the folded weights as plain
  conv2d + relu; inductor then packs them itself when it compiles with freezing.
Under autocast the folded op computes in the autocast dtype, as the eager conv would; where
oneDNN has no bf16 kernel for this CPU (AVX2 without AVX512-BF16/AVX-NE-CONVERT) the
packing fails once and that dtype takes the plain path from then on.

A BN-ReLU that cannot fold (the residual's first one: its input is also the skip) stays one
fused eval pass (fasthg.nn.BNReLU in eval mode).

Fewer fresh tensors: on the CPU a new activation of 32 MiB or more (hg8's 64x64 maps at batch
8) is a fresh mapping whose pages fault in as it is written, which costs about as much as the
pass that writes it. So the folded model writes where it can into memory it already holds:
a residual's sum into its skip or dying input, an hourglass's merge into its up branch, the
inter-stack sum into the stack's input, and each residual's first BN-ReLU, which its first
convolution reads at once, into one scratch tensor per shape that lives for one forward call.
"""
import contextvars
import copy
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fasthg import ops
from fasthg.models.hourglass import Hourglass, Residual, StackedHourglass
from fasthg.nn import BNReLU, MaxPool2x2
from fasthg.nn.conv2d import is_plain
from fasthg.ops.layout import memory_format_of

# Packed weights kept per module, one per (dtype, input shape); a few shapes cover a run
# (the eval loop's last, smaller batch included).
_PACK_CACHE_SIZE = 4


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


# The scratch tensors of the forward calls running in this thread (contextvars are per
# thread), innermost last, each by (shape, memory format, dtype, device): pushed and popped by
# hooks on for_inference's root. Not while tracing: the traced graph allocates as it likes.
_scratch: contextvars.ContextVar[tuple] = contextvars.ContextVar("fasthg_fold_scratch", default=())


def _open_scratch(module, args):
    if not _tracing():
        _scratch.set(_scratch.get() + ({},))


def _close_scratch(module, args, output):
    if not _tracing():
        _scratch.set(_scratch.get()[:-1])


def _scratch_like(x: torch.Tensor) -> Optional[torch.Tensor]:
    """This call's scratch tensor shaped and laid out like x (made on first use), or None
    outside a folded model's forward."""
    calls = _scratch.get()
    if not calls:
        return None
    fmt = memory_format_of(x)
    key = (tuple(x.shape), fmt, x.dtype, x.device)
    if key not in calls[-1]:
        calls[-1][key] = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    return calls[-1][key]


class FoldedConvReLU(nn.Module):
    """A Conv2d with its following BatchNorm folded in (or none: a plain conv, pre-packed)
    and, with `relu`, the BN's ReLU run as the conv's post-op; forward(x, add) adds `add`
    to the conv's output before the ReLU. Inference only: its weight and bias are buffers
    (no gradients) and train(True) raises."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride, padding, relu: bool = True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.relu = list(stride), list(padding), relu
        self.training = False
        self._packed = {}  # (dtype, shape, weight version) -> packed weight, or None where oneDNN cannot pack it

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("FoldedConvReLU is inference-only: a model from fasthg.fuse.for_inference has its "
                               "BatchNorms folded away and cannot train; train the original model")
        return super().train(False)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), ...: new weights, packed again when next used
        self._packed = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):  # torch.save of the model: packed MKLDNN tensors do not pickle
        return {**self.__dict__, "_packed": {}}

    def __deepcopy__(self, memo):  # packed MKLDNN tensors cannot be deep-copied; they are repacked
        new = FoldedConvReLU(copy.deepcopy(self.weight, memo), copy.deepcopy(self.bias, memo), self.stride,
                             self.padding, self.relu)
        memo[id(self)] = new
        return new

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def _plain(self, x, add=None):
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if add is not None:
            y = y + add  # promoting as eager's residual sum does (under autocast a bf16 body, a float32 skip)
        return F.relu(y, inplace=True) if self.relu else y

    def _packed_weight(self, dtype, shape) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        key = (dtype, shape, self.weight._version, self.bias._version)  # load_state_dict writes in place
        if key not in self._packed:
            if len(self._packed) >= _PACK_CACHE_SIZE:
                self._packed.pop(next(iter(self._packed)))
            try:
                w = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight.to(dtype), self.padding, self.stride, [1, 1], 1, list(shape))
                self._packed[key] = (w, self.bias.to(dtype))
            except RuntimeError:  # no oneDNN kernel for this dtype on this CPU
                self._packed[key] = None
        return self._packed[key]

    def forward(self, x, add: Optional[torch.Tensor] = None, inplace: bool = False):
        """inplace: the sum may be written into `add` (its caller knows nothing reads it after),
        oneDNN's in-place binary post-op, which saves reading `add` and writing a new tensor."""
        if _tracing() or x.requires_grad:
            return self._plain(x, add)
        dtype = self._compute_dtype(x)
        if x.device.type == "cpu":
            if (torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
                    and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous()):
                packed = self._packed_weight(dtype, tuple(x.shape))
                if packed is not None:
                    w, b = packed
                    relu = "relu" if self.relu else "none"
                    if add is None:
                        return torch.ops.mkldnn._convolution_pointwise(
                            x.to(dtype), w, b, self.padding, self.stride, [1, 1], 1, relu, [], "")
                    if add.dtype == dtype and add.is_contiguous(memory_format=torch.channels_last):
                        if inplace:
                            return torch.ops.mkldnn._convolution_pointwise_.binary(
                                add, x.to(dtype), w, b, self.padding, self.stride, [1, 1], 1, "add", None,
                                relu if self.relu else None, [], None)
                        return torch.ops.mkldnn._convolution_pointwise.binary(
                            x.to(dtype), add, w, b, self.padding, self.stride, [1, 1], 1, "add", None,
                            relu if self.relu else None, [], None)
        elif x.device.type == "cuda" and self.relu and add is None and torch.backends.cudnn.is_available():
            w, b = self.weight.to(dtype), self.bias.to(dtype)
            return torch.cudnn_convolution_relu(x.to(dtype), w, b, self.stride, self.padding, [1, 1], 1)
        return self._plain(x, add)

    def extra_repr(self):
        o, i, kh, kw = self.weight.shape
        return f"{i}, {o}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, padding={tuple(self.padding)}, " \
               f"relu={self.relu}"


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """The conv's weight and bias with the eval-mode BN folded in, computed in float64 and
    returned in the conv weight's dtype."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                                device=w.device)
    g = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.affine:
        g = g * bn.weight.detach().double()
    shift = bn.bias.detach().double() if bn.affine else torch.zeros_like(g)
    dtype = conv.weight.dtype
    return ((w * g.view(-1, 1, 1, 1)).to(dtype).contiguous(),
            ((b - bn.running_mean.detach().double()) * g + shift).to(dtype))


def _why_not(conv: nn.Conv2d, bn: nn.BatchNorm2d, after: Optional[nn.Module]) -> Optional[str]:
    """Why this conv -> BN pair cannot fold (None when it can)."""

    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "its BatchNorm has no running statistics (it normalises by each batch's own)"
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        return f"the convolution has groups={conv.groups}, dilation={tuple(conv.dilation)} (folding takes " \
               "groups=1, dilation=1)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"the convolution's padding is {conv.padding!r} with padding_mode={conv.padding_mode!r} (folding " \
               "takes explicit zero padding)"
    if conv.out_channels != bn.num_features:
        return f"the convolution's {conv.out_channels} output channels do not match the BatchNorm's " \
               f"{bn.num_features}"
    if not isinstance(bn, BNReLU) and not isinstance(after, nn.ReLU):
        return f"the BatchNorm is followed by {type(after).__name__ if after is not None else 'nothing'}, not a " \
               "ReLU (folding fuses conv, BN and ReLU together)"
    return None


def _fold_sequential(seq: nn.Sequential, prefix: str, folded: List[str]) -> None:
    from fasthg.nn import BNReLU

    children = list(seq.named_children())
    i = 0
    while i < len(children) - 1:
        (cname, conv), (bname, bn) = children[i], children[i + 1]
        if is_plain(conv) and isinstance(bn, nn.BatchNorm2d):
            after = children[i + 2][1] if i + 2 < len(children) else None
            why = _why_not(conv, bn, after)
            if why:
                warnings.warn(f"fasthg.fuse.for_inference: left {prefix}{cname} -> {prefix}{bname} unfolded: {why}",
                              stacklevel=3)
            else:
                weight, bias = fold_conv_bn(conv, bn)
                setattr(seq, cname, FoldedConvReLU(weight, bias, conv.stride, conv.padding, relu=True))
                setattr(seq, bname, nn.Identity())
                span = 2
                if not isinstance(bn, BNReLU):  # the ReLU module after a plain BatchNorm2d runs in the conv now
                    setattr(seq, children[i + 2][0], nn.Identity())
                    span = 3
                folded.append(f"{prefix}{cname}")
                i += span
                continue
        i += 1


def _packable(conv: nn.Module) -> bool:
    return (is_plain(conv) and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _pack_conv(conv: nn.Conv2d) -> FoldedConvReLU:
    """The same conv, nothing folded, on the folded convs' kernels (pre-packed weights)."""
    bias = conv.bias.detach().clone() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    return FoldedConvReLU(conv.weight.detach().clone().contiguous(), bias, conv.stride, conv.padding, relu=False)


class FoldedResidual(Residual):
    """fasthg's Residual with its last convolution adding the skip as the conv's post-op;
    set as the class of a Residual whose body ends in a FoldedConvReLU (same submodules).
    The sum is written into the skip tensor where that is a fresh 1x1 conv output, or where
    for_inference found that nothing reads the module's input after it (`input_dies`)."""

    input_dies = False

    def forward(self, x):
        body = list(self.body)
        h = self._first_bn_relu(body, x)
        for layer in body[1:-1]:
            h = layer(h)
        skip = self.skip(x)
        return body[-1](h, add=skip, inplace=skip is not x or self.input_dies)

    @staticmethod
    def _first_bn_relu(body, x):
        """body[0](x), written into the call's scratch tensor where body[1], a folded conv
        (whose output is its own), reads it and nothing else does."""
        bn = body[0]
        if (type(bn) is BNReLU and not bn.training and bn.running_mean is not None and len(body) > 2
                and isinstance(body[1], FoldedConvReLU) and not _tracing() and not x.requires_grad
                and x.is_contiguous(memory_format=memory_format_of(x))):
            return bn(x, out=_scratch_like(x))
        return bn(x)


class FoldedHourglass(Hourglass):
    """fasthg's Hourglass with its down branch first, so that up1 reads x last (and may sum
    into it, where the hourglass's own input dies with it: the nested ones)."""

    def forward(self, x):
        low = self.low3(self.low2(self.low1(ops.max_pool2x2(x, backend=self.backend))))
        up1 = self.up1(x)
        # up1 is a folded residual's own tensor (a fresh one, or its dying input): the sum goes into it
        if (isinstance(_last(self.up1), FoldedResidual) and not _tracing()
                and not (up1.requires_grad or low.requires_grad)
                and torch.promote_types(low.dtype, up1.dtype) == up1.dtype):
            return ops.upsample_add_(low.to(up1.dtype), up1, backend=self.backend)
        return self._merge(low, up1)


class FoldedStackedHourglass(StackedHourglass):
    """fasthg's StackedHourglass whose sum of a stack's input and its remapped features and
    heatmaps runs in the remap convolutions' post-ops, written into the stack's input (made by
    the stem or the previous sum, and read by nothing after it)."""

    def _next_input(self, i, x, feat, hm):
        features, heatmaps = self.remap_features[i], self.remap_heatmaps[i]
        if not (isinstance(features, FoldedConvReLU) and isinstance(heatmaps, FoldedConvReLU)):
            return super()._next_input(i, x, feat, hm)
        return heatmaps(hm, add=features(feat, add=x, inplace=True), inplace=True)


def _last(module: nn.Module) -> nn.Module:
    """The module that makes `module`'s output: the last of a row of residuals (num_blocks > 1)."""
    return module[-1] if type(module) is nn.Sequential and len(module) else module


def _both(v, n: int) -> bool:
    """Whether an int-or-pair module argument is (n, n)."""
    return v == n if isinstance(v, int) else tuple(v) == (n, n)


def _is_max_pool2x2(module: nn.Module) -> bool:
    return (type(module) is nn.MaxPool2d and _both(module.kernel_size, 2)
            and _both(module.stride if module.stride else module.kernel_size, 2)
            and _both(module.padding, 0) and _both(module.dilation, 1) and not module.ceil_mode
            and not module.return_indices)


# Modules whose output is a tensor of their own (not their input, nor a view of it).
_FRESH = (FoldedConvReLU, FoldedResidual, nn.MaxPool2d, Hourglass)


def _mark_dying_inputs(model: nn.Module) -> None:
    """Sets input_dies on the FoldedResiduals whose input nothing reads after them: in an
    nn.Sequential (which hands each output to the next module only), those whose input a
    module of _FRESH made (nn.Identity passing it on); an Hourglass's down-branch ones, a
    nested Hourglass's up1, and StackedHourglass's features residual (the hourglass output
    feeds only it). In a row of residuals (num_blocks > 1) the first reads the row's input."""
    def dies(module):
        if isinstance(module, FoldedResidual):
            module.input_dies = True
        elif type(module) is nn.Sequential and len(module):
            dies(module[0])

    for module in model.modules():
        if type(module) is nn.Sequential:
            fresh = False  # whether the tensor flowing at this point was made inside the Sequential
            for child in module.children():
                if fresh:
                    dies(child)
                if type(child) is not nn.Identity:
                    fresh = isinstance(child, _FRESH)
        if type(module) is Hourglass:
            module.__class__ = FoldedHourglass
            for child in (module.low1, module.low2, module.low3):
                dies(child)
            if isinstance(module.low2, Hourglass):
                dies(module.low2.up1)
    if type(model) is StackedHourglass:
        model.__class__ = FoldedStackedHourglass
        for seq in model.features:
            dies(seq[0])


def for_inference(model: nn.Module) -> nn.Module:
    """An inference-only deep copy of `model` in which every BatchNorm2d (fasthg.nn.BNReLU
    included) that directly follows an nn.Conv2d inside an nn.Sequential is folded into
    that conv, its ReLU running as the conv's post-op (see this module's docstring for the
    kernels). In fasthg's StackedHourglass: the stem's conv + BN, each Residual's BN2 and
    BN3 (after conv1 and conv2), and each stack's features conv + BN. Every other BN
    (the residual's first, whose input is also the skip) stays, in eval mode: one fused
    pass. Every other convolution (groups=1, no dilation) runs on the same kernels without a
    ReLU, and fasthg's Residual adds its skip in its last convolution's post-op. Every
    nn.MaxPool2d(2, 2) runs fasthg.ops.max_pool2x2.

    The original model is untouched. A model in training mode is accepted: the copy is put
    in eval mode (the original stays in training mode), and the copy cannot go back to
    training (its train(True) raises). A pair that cannot fold correctly (a BN without
    running statistics, a conv with groups or dilation, a plain BatchNorm2d not followed by
    nn.ReLU) is left as it is, with a warning naming the modules. Only exact nn.Sequential
    containers are walked, where a conv's output feeds only the next module; a subclass
    may have its own forward.

    In fasthg's models, a residual's sum is written into its skip tensor where nothing in
    the model reads that tensor afterwards (the caller's images never), an hourglass's merge
    into its up branch, and the inter-stack sum into the stack's input; each residual's
    first BN-ReLU is written into a scratch tensor that the copy's forward call holds (hooks
    on the returned root open and close it; each thread's call has its own). So a forward
    hook that keeps such an intermediate tensor sees it overwritten; outputs are never
    reused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"for_inference: model must be a torch.nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model).eval()
    folded: List[str] = []
    for name, module in list(out.named_modules()):
        if type(module) is nn.Sequential:
            _fold_sequential(module, f"{name}." if name else "", folded)
    for module in list(out.modules()):
        for cname, child in list(module.named_children()):
            if _packable(child):
                setattr(module, cname, _pack_conv(child))
    for module in out.modules():
        if type(module) is Residual and isinstance(module.body[-1], FoldedConvReLU):
            module.__class__ = FoldedResidual
        if _is_max_pool2x2(module):
            module.__class__ = MaxPool2x2
            module.backend = getattr(out, "backend", "auto")
    _mark_dying_inputs(out)
    for module in out.modules():
        if getattr(module, "memory", None) == "recompute":  # a training-memory mode: nothing to save here
            module.memory = "default"
    for p in out.parameters():
        p.requires_grad_(False)
    out.register_forward_pre_hook(_open_scratch)
    out.register_forward_hook(_close_scratch, always_call=True)
    out.folded_convs = folded  # what was folded, for a report or a test
    return out.eval()
