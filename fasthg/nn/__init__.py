"""Modules built on the fused ops."""
from fasthg.nn.bn_relu import BNReLU, convert_sync_bn_relu

__all__ = ["BNReLU", "convert_sync_bn_relu"]
