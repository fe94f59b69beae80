"""BNAddReLU: a BatchNorm2d whose output is added to a residual and clamped, fused: what
fasthg.accelerate puts in place of a residual block's `relu(bn(x) + identity)`."""
import torch
import torch.nn.functional as F
from torch import nn

from fasthg import ops
from fasthg.ops.bn_relu import batch_norm_args


class BNAddReLU(nn.BatchNorm2d):
    """nn.BatchNorm2d whose forward(x, residual) is relu(bn(x) + residual), fused
    (fasthg.ops.bn_add_relu). A subclass of nn.BatchNorm2d with its arguments, parameters and
    buffers, so state_dicts load unchanged; plus `backend`, and `sync`/`process_group` as
    fasthg.nn.BNReLU has them. Called with x alone it is the plain BatchNorm2d it was (as
    fasthg.accelerate's untouched call sites and re-traces call it)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, backend="auto", sync=False, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend, self.sync, self.process_group = backend, sync, process_group

    def forward(self, x, residual=None):
        if residual is None:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"BNAddReLU: expected a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BNAddReLU: expected {self.num_features} channels, got input of shape {tuple(x.shape)}")
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

    def extra_repr(self):
        return super().extra_repr() + f", backend={self.backend!r}" + (", sync=True" if self.sync else "")
