"""Keep the memory that tensors free inside the process (glibc malloc), for CPU training and serving.

glibc hands large blocks back to the kernel on free and maps fresh pages for the next one, so
every activation pays page faults on first touch, before any arithmetic. With mmap off for
allocations and no heap trimming, freed blocks are reused as a caching allocator would: training
steps and served requests get faster (figures in bench/README.md), for some more peak resident
memory, which the process keeps. Process-wide, so only the
package's own processes (the trainer's and the server's CLI) turn it on; library code never does.
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


def add_release_argument(parser) -> None:
    """The command-line opt-out of `cache_freed_memory`, shared by the package's CLIs."""
    parser.add_argument(
        "--release-freed-memory",
        action="store_true",
        help="let malloc return freed memory to the system (default: keep it for reuse, ~20%% "
        "faster CPU steps and requests for more resident memory; see paradis_fast/memory.py)",
    )


def configure(args) -> None:
    """Keep freed memory unless the command line said ``--release-freed-memory``."""
    if not args.release_freed_memory:
        cache_freed_memory()
