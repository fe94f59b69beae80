"""Fused ops, each with backend="auto" | "eager" | "native" | "triton"."""
from fasthg.ops._backend import BACKENDS, available
from fasthg.ops.upsample_add import upsample_add

__all__ = ["BACKENDS", "available", "upsample_add"]
