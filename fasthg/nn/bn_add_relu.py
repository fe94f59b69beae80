"""BNAddReLU: a BatchNorm2d whose output is added to a residual and clamped, fused: what
fasthg.accelerate puts in place of a residual block's `relu(bn(x) + identity)`."""
import torch
import torch.nn.functional as F

from fasthg import ops
from fasthg.nn.fused_bn import FusedBatchNorm2d
from fasthg.ops.bn_relu import batch_norm_args


class BNAddReLU(FusedBatchNorm2d):
    """nn.BatchNorm2d whose forward(x, residual) is relu(bn(x) + residual), fused
    (fasthg.ops.bn_add_relu): nn.BatchNorm2d's arguments, parameters and buffers, plus
    `backend`, `sync` and `process_group` (fasthg.nn.fused_bn). Called with x alone it is the
    plain BatchNorm2d it was (as fasthg.accelerate's re-traces call it)."""

    def forward(self, x, residual=None):
        if residual is None:
            return super().forward(x)
        self.check_input(x)
        fits = (isinstance(residual, torch.Tensor) and residual.shape == x.shape and residual.dtype == x.dtype
                and residual.device == x.device)
        if not fits and self.sync:
            raise ValueError(f"BNAddReLU: with sync=True, `residual` must match `x` ({tuple(x.shape)}, {x.dtype}), "
                             f"got {getattr(residual, 'shape', type(residual).__name__)}, {getattr(residual, 'dtype', '')}")
        rm, rv, use_batch_stats, factor = batch_norm_args(self)  # exactly as nn.BatchNorm2d
        if not fits:  # broadcasting or type promotion: the original ops
            return F.relu(F.batch_norm(x, rm, rv, self.weight, self.bias, use_batch_stats, factor, self.eps) + residual)
        return ops.bn_add_relu(x, residual, self.weight, self.bias, rm, rv, use_batch_stats, factor, self.eps,
                               backend=self.backend, sync=self.sync, process_group=self.process_group)
