"""fasthg.bench.malloc.keep_freed_memory: after it, a big block comes from glibc's heap rather
than a fresh mmap, and freeing it does not hand the pages back to the OS."""
import subprocess
import sys

import pytest

from fasthg.bench import malloc

PROBE = r"""
import ctypes
from fasthg.bench import malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = malloc.keep_freed_memory()
size = 64 << 20
before = libc.mallinfo2()
p = libc.malloc(size)
ctypes.memset(p, 1, size)
during = libc.mallinfo2()
libc.free(p)
after = libc.mallinfo2()
grew = lambda a, b: a - b >= size // 2  # the heap's free top may have held part of it
print(kept, grew(during.hblkhd, before.hblkhd), grew(during.arena, before.arena), grew(after.arena, before.arena))
"""


@pytest.mark.skipif(malloc._glibc() is None or not hasattr(malloc._glibc(), "mallinfo2"),
                    reason="needs glibc 2.33+ (mallinfo2)")
@pytest.mark.parametrize("keep", [False, True])
def test_big_blocks_stay_in_the_heap_once_kept(keep):
    probe = PROBE if keep else PROBE.replace("kept = malloc.keep_freed_memory()", "kept = False")
    # A fresh process: keeping freed memory is process-wide and cannot be undone.
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    kept, mmapped, in_heap, heap_kept = (v == "True" for v in out)
    assert kept is keep
    # Default glibc: a 64 MiB block is its own mmap and goes back on free; kept: heap, and stays.
    assert (mmapped, in_heap, heap_kept) == ((False, True, True) if keep else (True, False, False))


def test_non_glibc_is_a_no_op(monkeypatch):
    monkeypatch.setattr(malloc, "_glibc", lambda: None)
    assert malloc.keep_freed_memory() is False
