"""Interleaved median timing and the machine record of a benchmark run.

Methods are timed round-robin (a, b, c, d, a, b, ...) so that load from other processes on a
shared machine hits every method alike: the ratios stay meaningful even when absolute times drift.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], device: str, reps: int, warmup: int = 2
) -> Dict[str, float]:
    """Median seconds per call of each function, timed round-robin after `warmup` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def dense_mm(flops: float, device: str, dtype: torch.dtype):
    """One dense torch.mm of about `flops` ([512, 512] x [512, n]): the GEMM bound of a layer.
    Returns the call and the FLOPs it does."""
    m = k = 512
    n = max(16, round(flops / (2 * m * k)))
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * m * k * n


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return commit + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str) -> Dict[str, str]:
    """What the numbers were measured on (and how loaded the machine was at the start)."""
    info = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
