"""BNReLU: a drop-in for nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()) running the fused op."""
from torch import nn

from fasthg import ops
from fasthg.nn.bn_add_relu import BNAddReLU
from fasthg.ops.bn_relu import batch_norm_args


class BNReLU(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, fused. A subclass of nn.BatchNorm2d: the same
    arguments (momentum=None for a cumulative average, affine, track_running_stats), the
    same parameters and buffers (num_batches_tracked included), so state_dicts load
    unchanged; plus `backend` ("auto", "eager", "native", "triton") and, like
    nn.SyncBatchNorm, `sync` and `process_group`: training statistics of the whole batch
    across processes (see convert_sync_bn_relu)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, backend="auto", sync=False, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend, self.sync, self.process_group = backend, sync, process_group

    def forward(self, x, out=None):
        """out: for inference (eval mode, running statistics, no gradient), a tensor like x
        that the result is written into (fasthg.ops.bn_relu's `out`)."""
        if x.dim() != 4:
            raise ValueError(f"BNReLU: expected a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BNReLU: expected {self.num_features} channels, got input of shape {tuple(x.shape)}")
        rm, rv, use_batch_stats, factor = batch_norm_args(self)  # exactly as nn.BatchNorm2d
        return ops.bn_relu(x, self.weight, self.bias, rm, rv, use_batch_stats, factor, self.eps,
                           backend=self.backend, sync=self.sync, process_group=self.process_group, out=out)

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}" + (", sync=True" if self.sync else "")


def convert_sync_bn_relu(module: nn.Module, process_group=None) -> nn.Module:
    """Switches every BNReLU (and BNAddReLU) in `module` to cross-process statistics over `process_group`
    (default: all processes), in place, and returns `module` (cf. nn.SyncBatchNorm's
    convert_sync_batchnorm)."""
    for m in module.modules():
        if isinstance(m, (BNReLU, BNAddReLU)):
            m.sync, m.process_group = True, process_group
    return module
