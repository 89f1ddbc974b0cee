"""Choose the switch for a set of devices: the one whose slowest device finishes first.

Device j of a switch runs part j; its time is the part's FLOPs over the device's relative
capacity. Within a switch, larger parts go to faster devices (sorting both and pairing them
minimises the slowest device's time). Only switches with at most as many sub-networks as there
are devices are considered; ties in time are broken by accuracy when given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..switches import Switch, SwitchLike, SwitchSet, SwitchSetLike

__all__ = ["plan", "Plan", "Candidate", "part_flops"]


@dataclass(frozen=True)
class Candidate:
    """One switch placed on the devices: part j runs on device ``devices[j]``."""

    switch: Switch
    part_flops: tuple[float, ...]
    devices: tuple[int, ...]
    time: float  # slowest device's FLOPs / capacity
    accuracy: float | None


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    candidates: tuple[Candidate, ...]  # every switch that fits, fastest first
    skipped: tuple[Switch, ...]  # switches needing more devices than there are

    @property
    def switch(self) -> Switch:
        return self.choice.switch

    def table(self) -> str:
        """The candidates as a text table, the choice marked with '*'."""
        rows = [f"  {'switch':<16} {'time':>10} {'accuracy':>9}  part -> device (FLOPs)   [time = FLOPs / capacity]"]
        for c in self.candidates:
            mark = "*" if c is self.choice else " "
            accuracy = "-" if c.accuracy is None else f"{c.accuracy:.4f}"
            placed = ", ".join(f"{j}->{d} ({f:.4g})" for j, (f, d) in enumerate(zip(c.part_flops, c.devices)))
            rows.append(f"{mark} {str(c.switch):<16} {c.time:>10.4g} {accuracy:>9}  {placed}")
        rows += [f"  {str(s):<16} needs {s.num_devices} devices" for s in self.skipped]
        return "\n".join(rows)


def part_flops(model, switches: SwitchSetLike, input_shape: Sequence[int]) -> dict[Switch, tuple[int, ...]]:
    """FLOPs per image of every part of every switch of `model`, from `split`."""
    from .split import split

    return {s: tuple(stat.flops for stat in split(model, s).stats(input_shape)) for s in SwitchSet.of(switches)}


def _place(switch: Switch, flops: Sequence[float], capacities: Sequence[float], accuracy: float | None) -> Candidate:
    parts = sorted(range(len(flops)), key=lambda j: -flops[j])
    devices = sorted(range(len(capacities)), key=lambda d: -capacities[d])
    placement = dict(zip(parts, devices))
    time = max(flops[j] / capacities[placement[j]] for j in parts)
    return Candidate(switch, tuple(flops), tuple(placement[j] for j in range(len(flops))), time, accuracy)


def plan(
    capacities: Sequence[float],
    switches: SwitchSetLike,
    accuracy: Mapping[SwitchLike, float] | None = None,
    flops: Mapping[SwitchLike, Sequence[float]] | None = None,
) -> Plan:
    """The `Plan` for devices of relative `capacities` (e.g. ``[2, 1, 1]``).

    `flops` gives each switch's FLOPs per part (see `part_flops`); without it a sub-network of
    width w costs w**2 (the convs between sliced layers dominate and scale with both widths).
    """
    capacities = [float(c) for c in capacities]
    if not capacities or not all(math.isfinite(c) and c > 0 for c in capacities):
        raise ValueError(f"capacities must be positive numbers, one per device, got {capacities}")
    switches = SwitchSet.of(switches)
    accuracy = {Switch.parse(k): float(v) for k, v in (accuracy or {}).items()}
    flops = {Switch.parse(k): v for k, v in flops.items()} if flops is not None else None
    candidates, skipped = [], []
    for switch in switches:
        if switch.num_devices > len(capacities):
            skipped.append(switch)
            continue
        if flops is None:
            costs = [float(w) ** 2 for w in switch.widths]
        elif switch not in flops or len(flops[switch]) != switch.num_devices:
            raise ValueError(f"flops: need {switch.num_devices} part FLOPs for switch {switch}")
        else:
            costs = list(flops[switch])
        candidates.append(_place(switch, costs, capacities, accuracy.get(switch)))
    if not candidates:
        raise ValueError(f"no switch of [{switches}] fits {len(capacities)} device(s)")
    fastest = min(c.time for c in candidates)
    tied = [c for c in candidates if math.isclose(c.time, fastest, rel_tol=1e-9)]
    choice = max(tied, key=lambda c: -math.inf if c.accuracy is None else c.accuracy)  # first wins a full tie
    candidates.sort(key=lambda c: c.time)
    return Plan(choice, tuple(candidates), tuple(skipped))
