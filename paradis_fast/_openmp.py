"""OpenMP waiting that survives a busy machine; imported before torch, which loads libgomp.

libgomp reads its settings once, when it is loaded. By default a thread that finishes its share of a
parallel region spins 300,000 times before it sleeps: when another process takes a core from one of
torch's threads, the other threads spin against it and every region waits for its next time slice
(the main job fell to a few percent of its quiet speed beside two busy processes; bench/README.md).
A short spin keeps the quiet speed and sleeps soon enough to give the core back.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "1000"


def set_default_wait_policy() -> None:
    """Sets ``GOMP_SPINCOUNT`` unless the user chose a wait policy or libgomp is already loaded."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
