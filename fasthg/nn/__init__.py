"""Modules built on the fused ops."""
from fasthg.nn.bn_add_relu import BNAddReLU
from fasthg.nn.bn_relu import BNReLU, convert_sync_bn_relu

__all__ = ["BNAddReLU", "BNReLU", "convert_sync_bn_relu"]
