"""Keeping freed CPU memory in the process, for steady-state CPU timings.

glibc's malloc serves big blocks (here: every feature map) with fresh mmap pages and gives
freed memory back to the OS; each new block then pays a page fault per 4 KiB page when it is
first written, which on a shared VM can take longer than the kernels that fill the block,
and makes timings depend on the state of the heap. Keeping freed
memory (as jemalloc and tcmalloc do) removes that cost from eager and fused ops alike.
"""
import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse in this process: big blocks come from the heap
    instead of mmap, and the heap is never trimmed. Process-wide and for the process's
    lifetime; its memory then stays at its peak. Returns False (and does nothing) where the
    C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
