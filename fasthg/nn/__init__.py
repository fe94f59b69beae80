"""Modules built on the fused ops."""
from fasthg.nn.bn_add_relu import BNAddReLU
from fasthg.nn.bn_relu import BNReLU, convert_sync_bn_relu
from fasthg.nn.conv2d import Conv2d
from fasthg.nn.max_pool2x2 import MaxPool2x2

__all__ = ["BNAddReLU", "BNReLU", "Conv2d", "MaxPool2x2", "convert_sync_bn_relu"]
