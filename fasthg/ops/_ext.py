"""Loads the native extension fasthg._C, whose import registers the fasthg:: ops (which of
their kernels exist for which device: fasthg.ops.registry.has_native), and says how it was built."""
import torch

try:
    from fasthg import _C  # noqa: F401

    LOAD_ERROR = None
except ImportError as e:  # not built: the eager and Triton backends still work
    _C = None
    LOAD_ERROR = e


def build_info() -> dict:
    try:
        from fasthg import _build_info as b

        return {"with_cuda": b.WITH_CUDA, "cuda_archs": b.CUDA_ARCHS, "built_against_torch": b.TORCH_VERSION}
    except ImportError:
        return {"with_cuda": False, "cuda_archs": "", "built_against_torch": None}
