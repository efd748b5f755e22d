"""Keep long runs in constant memory on Linux.

glibc raises its mmap threshold each time a large block is freed, after which frame-sized buffers (tens of MB) come
from the heap; small tensors that outlive them (per-frame face data) then pin the heap so it can never shrink, and
resident memory grows with every frame decoded. Fixing the threshold at 1 MiB keeps every frame buffer in its own
mapping, returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
_done = False


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Set glibc's mmap threshold once per process (no-op elsewhere). Returns whether it was applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):   # musl or another libc without mallopt
        _done = False
    return _done


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: Linux's ``VmHWM``, the high-water mark of its own address space.
    ``ru_maxrss`` (the fallback elsewhere) also keeps the resident size of the process it was forked from: a
    child started by a 1 GB test runner reports at least 1 GB whatever it used."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024
