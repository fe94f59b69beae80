"""Memory-format rules shared by every backend, so fake (meta) outputs have the strides
the real kernels produce."""
import torch
from torch._prims_common import suggest_memory_format


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The format a 4-D tensor's strides are closest to: ATen's suggest_memory_format, which
    the C++ kernels use too."""
    return suggest_memory_format(t) if t.dim() == 4 else torch.contiguous_format
