"""Fused ops, each with backend="auto" | "eager" | "native" | "triton"."""
from fasthg.ops._backend import BACKENDS, available
from fasthg.ops.bn_relu import bn_relu
from fasthg.ops.upsample_add import upsample_add

__all__ = ["BACKENDS", "available", "bn_relu", "upsample_add"]
