"""Keep the memory that tensors free inside the process (glibc malloc), for CPU training.

glibc hands large blocks back to the kernel on free and maps fresh pages for the next one, so
every activation of a training step pays page faults on first touch (measured here ~0.4 ms per MB:
a 50 MB activation costs ~20 ms before any arithmetic). With mmap off for allocations and no heap
trimming, freed blocks are reused as a caching allocator would: the ParaDiS MobileNet step of
bench/README.md went from ~550 to ~440 ms, for ~15% more peak resident memory, which the process
keeps. Process-wide, so only the trainer's own process (``python -m paradis_fast train``) turns
it on; library code never does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def cache_freed_memory() -> bool:
    """Configure glibc malloc to keep freed memory; True if it took effect (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # absent from musl
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
