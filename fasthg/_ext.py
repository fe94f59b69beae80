"""Loads the native extension fasthg._C (whose import registers the fasthg:: ops) and says
which of its kernels exist for which device."""
import torch

try:
    from fasthg import _C  # noqa: F401

    LOAD_ERROR = None
except ImportError as e:  # not built: the eager and Triton backends still work
    _C = None
    LOAD_ERROR = e


OPS = ("upsample_add", "bn_relu_forward")

# Looked up once: registrations do not change after import, and a plain dict lookup is
# something torch.compile can trace through.
_KERNELS = {
    (op, dev): _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fasthg::{op}", key)
    for op in OPS
    for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def has_kernel(op: str, device_type: str) -> bool:
    """Whether fasthg::<op> has a native kernel for a device type ("cpu" or "cuda")."""
    return _KERNELS.get((op, device_type), False)


def build_info() -> dict:
    try:
        from fasthg import _build_info as b

        return {"with_cuda": b.WITH_CUDA, "cuda_archs": b.CUDA_ARCHS, "built_against_torch": b.TORCH_VERSION}
    except ImportError:
        return {"with_cuda": False, "cuda_archs": "", "built_against_torch": None}
