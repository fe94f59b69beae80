"""Memory-format rules shared by every backend, so fake (meta) outputs have the strides
the real kernels produce."""
import torch


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The format a 4-D tensor's strides are closest to (ATen's suggest_memory_format)."""
    if t.dim() == 4 and t.layout == torch.strided:
        from torch._prims_common import are_strides_like_channels_last

        if are_strides_like_channels_last(t.shape, t.stride()):
            return torch.channels_last
    return torch.contiguous_format
