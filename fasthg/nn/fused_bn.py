"""What the fused BatchNorm modules (BNReLU, BNAddReLU) share: nn.BatchNorm2d's arguments,
parameters and buffers, so that state_dicts load unchanged, plus the fused op's `backend` and,
like nn.SyncBatchNorm, `sync` and `process_group`."""
from torch import nn

from fasthg import ops


class FusedBatchNorm2d(nn.BatchNorm2d):
    """A subclass of nn.BatchNorm2d: the same arguments (momentum=None for a cumulative
    average, affine, track_running_stats), parameters and buffers (num_batches_tracked
    included); plus `backend` ("auto", "eager", "native", "triton") and `sync` /
    `process_group`: training statistics of the whole batch across processes (see
    fasthg.nn.convert_sync_bn_relu)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, backend="auto", sync=False, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend, self.sync, self.process_group = backend, sync, process_group

    def check_input(self, x):
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels, got input of shape {tuple(x.shape)}")

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}" + (", sync=True" if self.sync else "")
