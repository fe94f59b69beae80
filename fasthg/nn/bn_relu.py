"""BNReLU: a drop-in for nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()) running the fused op."""
from torch import nn

from fasthg import ops
from fasthg.nn.fused_bn import FusedBatchNorm2d
from fasthg.ops.bn_relu import batch_norm_args


class BNReLU(FusedBatchNorm2d):
    """nn.BatchNorm2d followed by ReLU, fused: nn.BatchNorm2d's arguments, parameters and
    buffers, plus `backend`, `sync` and `process_group` (fasthg.nn.fused_bn)."""

    def forward(self, x, out=None, sums=None):
        """out: for inference (eval mode, running statistics, no gradient), a tensor like x
        that the result is written into (fasthg.ops.bn_relu's `out`). sums: x's per-channel
        sum and sum of squares from the op that wrote it, for the batch statistics in native
        CPU training (fasthg.ops.bn_relu's `sums`)."""
        self.check_input(x)
        rm, rv, use_batch_stats, factor = batch_norm_args(self)  # exactly as nn.BatchNorm2d
        return ops.bn_relu(x, self.weight, self.bias, rm, rv, use_batch_stats, factor, self.eps,
                           backend=self.backend, sync=self.sync, process_group=self.process_group, out=out,
                           sums=sums)

    def forward_with_skip(self, x):
        """(self(x), skip) for a residual block whose other branch takes x: give it `skip`
        (x's values; in native training its gradient joins grad_x in this op's backward pass,
        fasthg.ops.bn_relu_with_skip)."""
        self.check_input(x)
        rm, rv, use_batch_stats, factor = batch_norm_args(self)
        return ops.bn_relu_with_skip(x, self.weight, self.bias, rm, rv, use_batch_stats, factor, self.eps,
                                     backend=self.backend, sync=self.sync, process_group=self.process_group)


def convert_sync_bn_relu(module: nn.Module, process_group=None) -> nn.Module:
    """Switches every BNReLU (and BNAddReLU) in `module` to cross-process statistics over `process_group`
    (default: all processes), in place, and returns `module` (cf. nn.SyncBatchNorm's
    convert_sync_batchnorm)."""
    for m in module.modules():
        if isinstance(m, FusedBatchNorm2d):
            m.sync, m.process_group = True, process_group
    return module
