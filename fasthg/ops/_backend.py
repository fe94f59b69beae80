"""Backend names and how `auto` picks one for a tensor."""
import os

import torch

from fasthg import _ext

BACKENDS = ("auto", "eager", "native", "triton")


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Read once, at import: triton reads TRITON_INTERPRET when it is first imported too.
_TRITON = _import_triton()
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return _TRITON


def triton_interpreted() -> bool:
    return _INTERPRETED


def triton_usable(device_type: str) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only under TRITON_INTERPRET=1 (for tests)."""
    if not triton_available():
        return False
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())


def resolve(backend: str, op: str, t: torch.Tensor) -> str:
    """The concrete backend (eager, native or triton) that runs `op` on tensors like `t`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = t.device.type
    if backend == "auto":
        if _ext.has_kernel(op, dev):
            return "native"
        if dev == "cuda" and triton_usable(dev):
            return "triton"
        return "eager"
    if backend == "native" and not _ext.has_kernel(op, dev):
        why = f"the extension failed to load: {_ext.LOAD_ERROR}" if _ext._C is None else (
            f"fasthg._C was built without {dev.upper()} kernels")
        raise RuntimeError(f"backend='native' cannot run {op} on {dev} tensors: {why}")
    if backend == "triton" and not triton_usable(dev):
        raise RuntimeError(
            f"backend='triton' cannot run {op} on {dev} tensors: Triton needs CUDA tensors "
            "(or TRITON_INTERPRET=1 for CPU tensors) and an importable triton package")
    return backend


def available(device_type: str, op: str = None) -> list:
    """The concrete backends that can run `op` (default: every fused op) on a device type."""
    out = ["eager"]
    if all(_ext.has_kernel(o, device_type) for o in ([op] if op else _ext.OPS)):
        out.append("native")
    if triton_usable(device_type):
        out.append("triton")
    return out
