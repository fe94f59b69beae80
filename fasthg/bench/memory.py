"""What a computation costs in memory, on any device: the peak bytes of the tensors it
allocates, and the bytes of activations autograd saves for backward.

CUDA has an allocator that keeps its own peak; the CPU does not, so there the tensors each op
returns are counted by a dispatch mode (outputs that alias an input, as in-place ops and views
do, allocate nothing) and released when the last tensor on their storage dies.
"""
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> [bytes, live tensors on it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t, inputs):
        key = t.untyped_storage().data_ptr()
        if key == 0 or key in inputs and key not in self.live:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


def peak_bytes(fn: Callable, device: torch.device) -> int:
    """Peak bytes of the tensors `fn()` allocates above what was live before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _LiveTensorBytes() as mode:
        fn()
    return mode.peak


def saved_activation_bytes(fn: Callable, parameters=()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn()` runs (the
    forward), parameters excluded: the activations a training step keeps alive."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
