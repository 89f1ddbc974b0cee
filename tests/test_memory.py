"""memory.cache_freed_memory: freed tensors' pages are reused instead of faulted in afresh.
Run in subprocesses: the setting is process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Page faults of each of 10 rounds of allocating, touching and freeing a 64 MB tensor. With the
# cache, a few rounds may still grow the heap (a small allocation can land in a freed block, so the
# next large one does not fit there); then the heap has room and is reused.
PROBE = """
import resource, sys, torch
from paradis_fast.memory import cache_freed_memory
if sys.argv[1] == "cache":
    assert cache_freed_memory()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20 // 4).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _faults(mode: str) -> list[int]:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [int(f) for f in run.stdout.split()]


def faulting(rounds: list[int]) -> int:
    """How many of the rounds after the first two mapped the tensor afresh (of 8)."""
    return sum(f > 8000 for f in rounds[2:])


def _huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_second_large_tensor_reuses_pages():
    # 64 MB is 16384 pages of 4 KB: mapped afresh by default (unless huge pages make them 32),
    # reused from the heap when cached
    if not _huge_pages_always():
        assert faulting(_faults("default")) >= 6
    assert faulting(_faults("cache")) <= 3
