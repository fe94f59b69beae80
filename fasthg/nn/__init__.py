"""Modules built on the fused ops."""
from fasthg.nn.bn_relu import BNReLU

__all__ = ["BNReLU"]
