"""Conv2d: nn.Conv2d run by fasthg.ops.conv2d (its backward on AMX where that runs)."""
from torch import nn

from fasthg import ops


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, values and gradients, so the same state_dict) whose backward
    comes from fasthg's AMX kernel in bf16 training on AMX CPUs (fasthg.ops.conv2d.fuses says
    where); nn.Conv2d's own forward everywhere else."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x):
        return ops.conv2d(x, self, backend=self.backend)


def is_plain(conv) -> bool:
    """Whether conv is an nn.Conv2d or this module, not a subclass with a forward of its own."""
    return type(conv) in (nn.Conv2d, Conv2d)
