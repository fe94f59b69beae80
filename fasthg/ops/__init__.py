"""Fused ops, each with backend="auto" | "eager" | "native" | "triton", each declared once in
fasthg.ops.registry (by its own module, on import)."""
from fasthg.ops import registry
from fasthg.ops._backend import BACKENDS, available
from fasthg.ops.upsample_add import upsample_add, upsample_add_  # (registered first: fasthg bench's order)
from fasthg.ops.bn_relu import bn_relu, bn_relu_with_skip  # noqa: E402,I001
from fasthg.ops.max_pool2x2 import max_pool2x2, max_pool2x2_with_skip  # noqa: E402
from fasthg.ops.bn_add_relu import bn_add_relu  # noqa: E402
from fasthg.ops.conv2d import conv2d  # noqa: E402 (the AMX weight gradient: not registered)
from fasthg.ops.conv_add import conv_add  # noqa: E402 (oneDNN's fused convolution: not registered)
from fasthg.ops.fork import fork  # noqa: E402 (autograd only: not registered)
from fasthg.ops.bn_relu_conv import bn_relu_conv, bn_relu_conv_with_skip, bn_relu_convs, fuses_conv1x1  # noqa: E402 (composes bn_relu's kernels: not registered)

__all__ = ["BACKENDS", "available", "bn_add_relu", "bn_relu", "bn_relu_with_skip", "bn_relu_conv", "bn_relu_conv_with_skip", "bn_relu_convs", "conv2d", "conv_add", "fork", "fuses_conv1x1", "max_pool2x2", "max_pool2x2_with_skip", "registry", "upsample_add", "upsample_add_"]
