"""The main job's throughput on a busy machine: ``python -m paradis_fast train`` alongside 0, 1 and 2
processes that each keep a core busy, under each OpenMP waiting setting.

    python bench/contention.py [--reps 3] [--epochs 1] [--settings NAME=ENV ...]

OpenMP threads that finish their share of a parallel region wait for the others at its end. libgomp
spins 300,000 times before sleeping (its default without OMP_WAIT_POLICY): when a busy neighbour
takes a core from one of torch's threads, the other spins against it instead of sleeping, and every
region waits for the preempted thread's next time slice. Runs are interleaved (each repeat runs every
busy count and setting in turn) so that drifts of the machine hit all alike; the table gives median
images/s and the fraction of the same setting's quiet throughput.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "paradis_fast default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
BUSY = "while True: pass"


def train_rate(env: dict, epochs: int) -> float:
    """Mean images/s over the epochs of one main-job run."""
    command = [sys.executable, "-m", "paradis_fast", "train", "--quiet", "--epochs", str(epochs)]
    out = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    rates = [float(rate) for rate in re.findall(r"(\d+) img/s", out)]
    return statistics.mean(rates)


def run_with_neighbours(busy: int, env: dict, epochs: int) -> float:
    neighbours = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5)
        return train_rate(env, epochs)
    finally:
        for process in neighbours:
            process.kill()
            process.wait()


def parse_settings(items: list[str] | None) -> dict:
    if not items:
        return SETTINGS
    settings = {}
    for item in items:
        name, _, assignments = item.partition("=")
        settings[name] = dict(pair.split(":", 1) for pair in assignments.split(",") if pair)
    return settings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="competing busy processes")
    parser.add_argument(
        "--settings", nargs="+", default=None, help="NAME=VAR:VALUE,VAR:VALUE ... (default: the three of the table)"
    )
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    rates = {(busy, name): [] for busy in args.busy for name in settings}
    for _ in range(args.reps):
        for busy in args.busy:
            for name, env in settings.items():
                rates[busy, name].append(run_with_neighbours(busy, env, args.epochs))
    print(f"main job images/s (median of {args.reps}) with busy neighbours on {os.cpu_count()} cores")
    print(f"{'setting':<22}" + "".join(f"{f'{busy} busy':>20}" for busy in args.busy))
    for name in settings:
        quiet = statistics.median(rates[args.busy[0], name])
        cells = []
        for busy in args.busy:
            rate = statistics.median(rates[busy, name])
            cells.append(f"{rate:8.0f} ({rate / quiet:4.0%})".rjust(20))
        print(f"{name:<22}" + "".join(cells))


if __name__ == "__main__":
    main()
