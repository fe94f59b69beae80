"""The fused ops, each declared once (by its module in fasthg/ops, with `register`), and what
reads them: `auto` and `available` (fasthg.ops._backend), `fasthg info`, the tests'
parametrisation, the Triton ahead-of-time compile list, the CUDA emulation list, the GPU
check's test list and the benchmark cases (fasthg.bench.cases).

An op named NAME lives in files of that name, which tests/test_registry.py requires:
    fasthg/ops/NAME.py         its Python entry, autograd and fake impls (it calls register)
    csrc/cpu/NAME.cpp          CPU kernels        csrc/cuda/NAME.cu   CUDA kernels
    kernels/NAME.py            Triton kernels, with compile_variants() for the AOT compile list
    tests/test_NAME.py         its tests          tests/cuda_emulation/emulate_NAME.cpp
and its float64 reference is `fasthg.ops.reference.NAME`. CONTRIBUTING.md has the checklist.
"""
import dataclasses
from typing import Callable, Dict, Tuple

import torch

BACKENDS = ("eager", "native", "triton")

# The dispatch keys a native kernel can be registered for, by torch device type.
_DISPATCH_KEYS = (("cpu", "CPU"), ("cuda", "CUDA"))


@dataclasses.dataclass(frozen=True)
class FusedOp:
    name: str
    # The fasthg:: schema whose kernel for a device's dispatch key means that the native
    # backend runs this op on that device.
    kernel: str
    # Every fasthg:: schema of its native kernels (csrc/ops.cpp defines them).
    schemas: Tuple[str, ...]
    # Its float64 eager composition (fasthg.ops.reference), the `eager` backend.
    reference: Callable
    # The public function, fasthg.ops.NAME(..., backend=).
    fn: Callable
    # Benchmark modes and the bytes a fused kernel must move in each, in units of one
    # full-resolution tensor (N*C*H*W elements): fasthg bench's GB/s column.
    traffic: Dict[str, float]
    # The speedup over eager the native backend must reach on the CPU in a mode (the
    # issues' bars), at BAR_LEVELS and float32; none where no issue set one.
    bars: Dict[str, float] = dataclasses.field(default_factory=dict)
    # Which positional argument of `fn` has the full-resolution shape [N, C, H, W] that
    # `traffic` counts in (the benchmarks find the model's shapes through it).
    shape_arg: int = 0
    backends: Tuple[str, ...] = BACKENDS
    # (channels, height, width) the benchmarks time it at when the hourglass does not run it
    # (fasthg.bench.cases.benchmark_shapes); the hourglass's ops are timed at the model's own.
    shapes: Tuple[Tuple[int, int, int], ...] = ()

    @property
    def test_file(self) -> str:
        return f"tests/test_{self.name}.py"


# Triton kernel modules (kernels/NAME.py, with compile_variants) of ops that are not fused ops
# of this registry (they have no kernels on every backend and device: the conv1x1 unit has
# Triton's and the CPU's): the ahead-of-time compile list covers them too, and
# tests/test_registry.py checks that every kernels/ module is listed somewhere.
TRITON_ONLY_KERNELS = ("conv1x1",)  # fasthg.ops.conv1x1.bn_relu_conv1x1

# fasthg:: schemas of csrc/ops.cpp that no registered op owns: the conv1x1 unit's CPU kernels
# (csrc/cpu/conv1x1.cpp; fasthg.ops.conv1x1), the name of the CPU GEMM kernel they run, and
# the convolution's backward on AMX (csrc/cpu/conv2d.cpp) and the Winograd 3x3 convolution
# (csrc/cpu/conv3x3_winograd.cpp), both fasthg.ops.conv2d's.
UNREGISTERED_SCHEMAS = ("bn_relu_conv1x1_forward", "bn_relu_conv1x1_backward", "cpu_gemm_kernel",
                         "conv2d_backward", "conv3x3_winograd", "conv3x3_winograd_backward")

# Feature-map sizes (height = width) at which the bars apply.
BAR_LEVELS = (64, 32)

_OPS: Dict[str, FusedOp] = {}
# (op name, device type) -> whether the native backend has the op there. Filled once, when
# the op registers: registrations do not change after import, and a plain dict lookup is
# something torch.compile can trace through.
_NATIVE: Dict[Tuple[str, str], bool] = {}


def register(op: FusedOp) -> FusedOp:
    from fasthg.ops import _ext

    if op.name in _OPS:
        raise ValueError(f"fused op {op.name!r} is registered twice")
    if op.kernel not in op.schemas:
        raise ValueError(f"fused op {op.name!r}: its kernel {op.kernel!r} is not one of its schemas {op.schemas}")
    _OPS[op.name] = op
    for dev, key in _DISPATCH_KEYS:
        _NATIVE[op.name, dev] = _ext._C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fasthg::{op.kernel}", key)
    return op


def get(name: str) -> FusedOp:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown fused op {name!r}: expected one of {', '.join(_OPS)}") from None


def ops() -> Tuple[FusedOp, ...]:
    """Every registered op, in registration order."""
    return tuple(_OPS.values())


def names() -> Tuple[str, ...]:
    return tuple(_OPS)


def has_native(name: str, device_type: str) -> bool:
    """Whether fasthg._C has the op's kernel for a device type ("cpu" or "cuda")."""
    return _NATIVE.get((name, device_type), False)


def test_files() -> Tuple[str, ...]:
    """Every op's test file, relative to the repository root (benchmarks/gpu_check.sh runs them
    under compute-sanitizer, listed by `python -m fasthg.ops --test-files`)."""
    return tuple(op.test_file for op in _OPS.values())
