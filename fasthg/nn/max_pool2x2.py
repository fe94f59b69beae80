"""MaxPool2x2: nn.MaxPool2d(2, 2) run by fasthg.ops.max_pool2x2 where that pays."""
import torch
from torch import nn

from fasthg import ops


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2, 2) (same values and gradients, no parameters, so the same state_dict)
    that runs fasthg.ops.max_pool2x2 on the CPU, and on any device where no gradient is taken.

    The op saves its input for backward where ATen saves int64 argmax indices: as many bytes in
    bf16, twice as few in float32. On a GPU that memory is what training is short of, so there,
    with a gradient, this is ATen's pool; on the CPU the op's two passes cost a third of ATen's
    (whose backward zero-fills grad_x and scatters into it)."""

    def __init__(self, backend: str = "auto"):
        super().__init__(2, 2)
        self.backend = backend

    def forward(self, x):
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-2] < 2 or x.shape[-1] < 2
                or (x.device.type != "cpu" and x.requires_grad and torch.is_grad_enabled())):
            return super().forward(x)
        return ops.max_pool2x2(x, backend=self.backend)
