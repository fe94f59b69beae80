"""fork(t) = (t, t) for a tensor two branches take, whose two gradients are then summed out of
place rather than by autograd's own accumulation.

Autograd sums the gradients of a tensor with two consumers in place (old.add_(new)). On the
CPU ATen's in-place bfloat16 add ran at half the speed of its out-of-place one (4x256x64x64,
AMX Xeon: 2.5 against 1.3 ms, benchmarks/results/HISTORY.md), and fasthg's upsample_add at
scale 1 (the same sum in one pass) at twice the out-of-place one's. The stacked hourglass has
two such tensors per stack boundary at full resolution (a stack's input, which its hourglass and
the next stack's input take, and its features, which the heatmap head and the remap take).
Elsewhere (other dtypes and devices, no gradient, backend="eager") it is (t, t) itself.
"""
import torch

from fasthg.ops import _backend, registry


class _Fork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.set_materialize_grads(False)
        return t.view_as(t), t.view_as(t)

    @staticmethod
    def backward(ctx, g1, g2):
        if g1 is None or g2 is None:
            return g2 if g1 is None else g1
        if g1.dim() == 4 and g1.shape == g2.shape and registry.has_native("upsample_add", g1.device.type):
            # upsample_add at scale 1 is the add in one pass, each sum rounded once as ATen's, at
            # twice ATen's out-of-place bf16 speed (HISTORY.md)
            return torch.ops.fasthg.upsample_add(g1, g2)
        return g1 + g2


def forks(t: torch.Tensor, backend: str = "auto") -> bool:
    """Whether fork sums t's two gradients itself: a bfloat16 CPU tensor that needs a gradient,
    in grad mode, and a backend other than eager."""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    return (backend != "eager" and t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.requires_grad
            and torch.is_grad_enabled())


def fork(t: torch.Tensor, backend: str = "auto"):
    """(t, t) for two consumers of t; see the module's docstring."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fork: `t` must be a torch.Tensor, got {type(t).__name__}")
    return _Fork.apply(t) if forks(t, backend) else (t, t)
