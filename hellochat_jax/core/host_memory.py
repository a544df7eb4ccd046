"""Host-memory settings for XLA on CPU: reuse freed memory instead of returning it to the OS.

XLA's CPU runtime allocates each step's temporaries afresh (one block of 130 MB for the tiny
thinker's train step, 1.7 GB for a 40M model's) from its worker threads. glibc serves such
blocks from a thread's own arena only up to 64 MB; beyond that it maps new pages and unmaps
them on free, so every step touches fresh pages: 35k page faults per tiny step, 430k per
40M step, 15-30% of the step's time on 2 cores (docs/performance.md). One arena that
never maps and never trims keeps those pages for the next step.

Call `reuse_freed_memory()` first thing in a process, before any thread has allocated:
`hellochat` and the bench scripts do. Linux/glibc only; elsewhere it does nothing.
`HELLOCHAT_MALLOC=default` in the environment leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_done = False


def reuse_freed_memory() -> bool:
    """Make glibc keep freed host memory for reuse. True where it took effect.

    Idempotent. Must run before other threads allocate: an arena limit set later does not
    move threads that already have their own arena."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("HELLOCHAT_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena (the main one: it grows without the 64 MB heap cap of thread arenas), no
    # mmap-served blocks, and no trimming (-1) of freed memory at the top of the heap.
    _done = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    return _done
