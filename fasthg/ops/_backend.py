"""Backend names and how `auto` picks one for a tensor."""
import os

import torch

from fasthg.ops import _ext, registry

BACKENDS = ("auto",) + registry.BACKENDS


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
    """The concrete backend (eager, native or triton) that runs the registered op `op` on
    tensors like `t`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    entry = registry.get(op)
    dev = t.device.type
    if backend == "auto":
        if "native" in entry.backends and registry.has_native(op, dev):
            return "native"
        if "triton" in entry.backends and dev == "cuda" and triton_usable(dev):
            return "triton"
        return "eager"
    if backend not in entry.backends:
        raise RuntimeError(f"backend={backend!r} has no {op}: its backends are {entry.backends}")
    if backend == "native" and not registry.has_native(op, dev):
        why = f"the extension failed to load: {_ext.LOAD_ERROR}" if _ext._C is None else (
            f"fasthg._C was built without {dev.upper()} kernels")
        raise RuntimeError(f"backend='native' cannot run {op} on {dev} tensors: {why}")
    if backend == "triton" and not triton_usable(dev):
        raise RuntimeError(
            f"backend='triton' cannot run {op} on {dev} tensors: Triton needs CUDA tensors "
            "(or TRITON_INTERPRET=1 for CPU tensors) and an importable triton package")
    return backend


def available(device_type: str, op: str = None) -> list:
    """The concrete backends that can run `op` (default: every registered op) on a device type."""
    entries = [registry.get(op)] if op else registry.ops()
    usable = {"eager": True, "native": lambda e: registry.has_native(e.name, device_type),
              "triton": lambda e: triton_usable(device_type)}
    return [b for b in registry.BACKENDS
            if all(b in e.backends and (usable[b] is True or usable[b](e)) for e in entries)]
