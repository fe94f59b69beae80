"""fasthg.accelerate's layout step: a CPU model's parameters and 4-D inputs channels_last, and
its 4-D outputs given back NCHW when the inputs came NCHW.

On the CPU oneDNN's convolutions run faster channels_last (bf16 most of all), as do fasthg's
fused ops, and fasthg.nn.Conv2d's AMX backward takes channels_last inputs only. Measured on a
2-core AMX Xeon (benchmarks/results/HISTORY.md), torchvision's ResNet-50, batch 8, bf16: NCHW
eager 624 ms a step, accelerated without this step 553 ms, with it 364 ms.

The step is two hooks on the model (module-level functions, so the model still pickles): the
pre-hook converts 4-D floating-point arguments and notes whether any was not channels_last;
the hook gives 4-D outputs back contiguous after such a call (a model of NCHW tensors returns
NCHW tensors), and leaves them as they are after a call with channels_last inputs.
"""
import torch
from torch import nn
from torch.utils import _pytree as pytree

CHOICES = ("auto", True, False)
_CALLS = "_fasthg_nchw_calls"  # per call of the model, whether it converted an input


def _image(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()


def _inputs_channels_last(module, args, kwargs):
    converted = False

    def convert(t):
        nonlocal converted
        if _image(t) and not t.is_contiguous(memory_format=torch.channels_last):
            converted = True
            return t.contiguous(memory_format=torch.channels_last)
        return t

    args, kwargs = pytree.tree_map(convert, (args, kwargs))
    getattr(module, _CALLS).append(converted)
    return args, kwargs


def _outputs_as_given(module, args, kwargs, output):
    if not getattr(module, _CALLS).pop():  # (also after a forward that raised: always_call)
        return output
    return pytree.tree_map(lambda t: t.contiguous() if _image(t) else t, output)


def has_it(model: nn.Module) -> bool:
    """Whether the layout step's hooks are on `model`."""
    return any(h is _inputs_channels_last for h in model._forward_pre_hooks.values())


def wanted(model: nn.Module, choice) -> bool:
    """Whether accelerate(channels_last=choice) converts `model`: True, or "auto" for a model
    with convolutions whose parameters are all on the CPU (where it was measured)."""
    if choice not in CHOICES or not isinstance(choice, (str, bool)):
        raise ValueError(f"accelerate: `channels_last` must be one of {CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    params = list(model.parameters())
    return (bool(params) and all(p.device.type == "cpu" for p in params)
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def convert(model: nn.Module) -> None:
    """The model's 4-D parameters and buffers channels_last (in place: the same Parameter
    objects) and the two hooks, once."""
    model.to(memory_format=torch.channels_last)
    if has_it(model):
        return
    setattr(model, _CALLS, [])
    model.register_forward_pre_hook(_inputs_channels_last, with_kwargs=True)
    model.register_forward_hook(_outputs_as_given, with_kwargs=True, always_call=True)
