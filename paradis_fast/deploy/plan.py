"""Choose the switch for a set of devices from its time, accuracy, communication and memory.

A switch's time per image is its compute time -- that of its slowest device, which takes its part's
FLOPs over its capacity -- plus its communication time: the bytes the switch exchanges per image
over `bandwidth` (every part but one sends its partial output to the device that fuses them; a
1-device switch exchanges nothing). Times are in the unit of FLOPs / capacity: with capacities in
FLOP/s and bandwidth in bytes/s they are seconds; with relative capacities (2, 1, 1), bandwidth and
budget count in the time a capacity-1 device takes for one FLOP.

Larger parts go to faster devices (sorting both and pairing them minimises the slowest device's
time); when a device's memory cannot hold the part this gives it, every placement is tried instead
(brute force, so memory constraints take at most 8 devices).

Without a latency budget the fastest switch wins, ties broken by accuracy; within a budget the most
accurate does, ties broken by time, as accuracy is what a budget leaves to gain. Switches needing
more devices than there are, fitting no placement in memory, or below `min_accuracy` are excluded;
`Plan.table` lists them with the reason.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ..errors import UserError
from ..switches import Switch, SwitchLike, SwitchSet, SwitchSetLike

__all__ = ["plan", "Plan", "Candidate", "PartCosts", "part_costs", "part_flops"]

MAX_SEARCH_DEVICES = 8  # trying every placement in memory costs up to 8! = 40320 tries per switch


@dataclass(frozen=True)
class Candidate:
    """One switch placed on the devices: part j runs on device ``devices[j]``."""

    switch: Switch
    part_flops: tuple[float, ...]
    devices: tuple[int, ...]  # () when no placement fits the devices' memory
    time: float  # compute + communication (inf when no placement fits)
    accuracy: float | None
    compute: float  # slowest device's FLOPs / capacity
    communication: float | None  # exchanged bytes / bandwidth; None: not modelled
    exchanged_bytes: float  # per image, 0 when unknown
    part_bytes: tuple[float, ...] | None  # weights of every part
    memory_use: tuple[float, float] | None  # (part bytes, device memory) of the fullest device
    why: str  # why chosen, passed over or excluded


@dataclass(frozen=True)
class Plan:
    choice: Candidate
    candidates: tuple[Candidate, ...]  # the eligible switches, fastest first
    skipped: tuple[Switch, ...]  # switches needing more devices than there are
    excluded: tuple[Candidate, ...] = ()  # fitting no placement in memory, or below min_accuracy
    notes: tuple[str, ...] = ()  # how the times were counted, printed above the table

    @property
    def switch(self) -> Switch:
        return self.choice.switch

    def table(self) -> str:
        """The notes, then every switch as a row of a text table, the choice marked with '*'."""
        header = ["", "switch", "compute", "comm", "time", "weights/memory", "accuracy", "part->device (FLOPs)", "why"]
        rows = [header]
        for c in (*self.candidates, *self.excluded):
            placed = ", ".join(f"{j}->{d} ({_si(f)})" for j, (f, d) in enumerate(zip(c.part_flops, c.devices)))
            rows.append(
                [
                    "*" if c is self.choice else "",
                    str(c.switch),
                    _time(c.compute),
                    _time(c.communication),
                    _time(c.time),
                    _memory_cell(c),
                    "-" if c.accuracy is None else f"{c.accuracy:.4f}",
                    placed or "-",
                    c.why,
                ]
            )
        rows += [["", str(s), "-", "-", "-", "-", "-", "-", f"needs {s.num_devices} devices"] for s in self.skipped]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        numeric = range(2, 7)
        lines = [
            "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        return "\n".join([*self.notes, *(line.rstrip() for line in lines)])


@dataclass(frozen=True)
class PartCosts:
    """Per switch: FLOPs per image and weight bytes of every part, and the bytes exchanged per
    image (every part but the fusing device's sends its partial output; getting the image to the
    devices is not counted, as it depends on where it comes from and in which dtype)."""

    flops: dict[Switch, tuple[int, ...]]
    exchanged_bytes: dict[Switch, int]
    part_bytes: dict[Switch, tuple[int, ...]]


def part_costs(model, switches: SwitchSetLike, input_shape: Sequence[int]) -> PartCosts:
    """`PartCosts` of every switch of `model`, from `split`'s per-part statistics."""
    from .split import split

    stats = {s: split(model, s).stats(input_shape) for s in SwitchSet.of(switches)}
    return PartCosts(
        {s: tuple(p.flops for p in parts) for s, parts in stats.items()},
        {s: sum(p.bytes_sent for p in parts) - max(p.bytes_sent for p in parts) for s, parts in stats.items()},
        {s: tuple(p.param_bytes for p in parts) for s, parts in stats.items()},
    )


def part_flops(model, switches: SwitchSetLike, input_shape: Sequence[int]) -> dict[Switch, tuple[int, ...]]:
    """FLOPs per image of every part of every switch of `model`, from `split`."""
    return part_costs(model, switches, input_shape).flops


def _si(value: float, unit: str = "") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _time(value: float | None) -> str:
    return "-" if value is None or math.isinf(value) else f"{value:.3g}"


def _memory_cell(c: Candidate) -> str:
    if c.memory_use is not None:
        used, capacity = c.memory_use
        return f"{_si(used, 'B')}/{_si(capacity, 'B')}"
    return "-" if c.part_bytes is None else _si(max(c.part_bytes), "B")


def _number(name: str, value, kind: str = "finite") -> float:
    """`value` as a finite float, "positive" or "non-negative" if `kind` says so; else a `UserError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and {"finite": True, "positive": number > 0, "non-negative": number >= 0}[kind]):
        raise UserError(f"{name} must be a {'' if kind == 'finite' else kind + ' '}finite number, got {value!r}")
    return number


def _per_part(table: Mapping[Switch, Sequence[float]], name: str, what: str, switch: Switch) -> list[float]:
    if switch not in table or len(table[switch]) != switch.num_devices:
        raise ValueError(f"{name}: need {switch.num_devices} part {what} for switch {switch}")
    return [_number(f"{name} of switch {switch}", v, "non-negative") for v in table[switch]]


def _memory(memory, devices: int) -> list[float] | None:
    """One memory capacity per device, from one per device or one for all."""
    if memory is None:
        return None
    values = [memory] * devices if isinstance(memory, numbers.Real) else list(memory)
    if len(values) != devices:
        raise UserError(f"memory: {len(values)} values for {devices} devices; give one per device or one for all")
    if devices > MAX_SEARCH_DEVICES:
        raise UserError(
            f"memory: placing parts within memory tries every placement, for at most {MAX_SEARCH_DEVICES} devices"
        )
    return [_number("memory", m, "positive") for m in values]


def _place(
    flops: Sequence[float], capacities: Sequence[float], sizes: Sequence[float] | None, memory: Sequence[float] | None
) -> tuple[tuple[int, ...], float] | None:
    """(device of every part, slowest device's time), the fastest placement fitting `memory`;
    None when none fits. Sorted pairing is the fastest of all; only when it does not fit is every
    placement tried."""

    def fits(devices: Sequence[int]) -> bool:
        return memory is None or all(size <= memory[d] for size, d in zip(sizes, devices))

    def slowest(devices: Sequence[int]) -> float:
        return max(f / capacities[d] for f, d in zip(flops, devices))

    parts = sorted(range(len(flops)), key=lambda j: -flops[j])
    by_speed = sorted(range(len(capacities)), key=lambda d: -capacities[d])
    pairing = dict(zip(parts, by_speed))
    sorted_pairing = tuple(pairing[j] for j in range(len(flops)))
    if fits(sorted_pairing):
        return sorted_pairing, slowest(sorted_pairing)
    placements = [p for p in itertools.permutations(range(len(capacities)), len(flops)) if fits(p)]
    if not placements:
        return None
    best = min(placements, key=slowest)
    return best, slowest(best)


def _memory_shortfall(sizes: Sequence[float], memory: Sequence[float]) -> str:
    """Why no placement fits: parts fit iff the k-th largest fits the k-th largest memory, for all k."""
    largest = sorted(memory, reverse=True)
    for k, j in enumerate(sorted(range(len(sizes)), key=lambda j: -sizes[j])):
        if sizes[j] > largest[k]:
            if k == 0:
                return f"part {j} needs {_si(sizes[j], 'B')} > {_si(largest[0], 'B')}"
            holders = sum(m >= sizes[j] for m in memory)
            return f"{k + 1} parts need >= {_si(sizes[j], 'B')}, {holders} device(s) hold that"
    raise AssertionError("a placement fits")


def _accuracy(c: Candidate) -> float:
    return -math.inf if c.accuracy is None else c.accuracy


def _choose(eligible: list[Candidate], latency_budget: float | None) -> tuple[Candidate, str]:
    """The choice (a full tie goes to the first in switch order) and why it was chosen."""
    if latency_budget is None:
        fastest = min(c.time for c in eligible)
        tied = [c for c in eligible if math.isclose(c.time, fastest, rel_tol=1e-9)]
        return max(tied, key=_accuracy), "chosen: fastest"
    within = [c for c in eligible if c.time <= latency_budget]
    if not within:
        fastest = min(eligible, key=lambda c: c.time)
        raise UserError(
            f"no switch meets the latency budget {latency_budget:.4g}: "
            f"the fastest, {fastest.switch}, takes {fastest.time:.4g}"
        )
    best = max(map(_accuracy, within))
    top = [c for c in within if _accuracy(c) == best]
    fastest = min(c.time for c in top)
    choice = next(c for c in top if math.isclose(c.time, fastest, rel_tol=1e-9))
    return choice, "chosen: fastest within budget" if best == -math.inf else "chosen: most accurate within budget"


def _passed_over(c: Candidate, choice: Candidate, latency_budget: float | None) -> str:
    if latency_budget is not None and c.time > latency_budget:
        return "over budget"
    if latency_budget is not None and _accuracy(c) < _accuracy(choice):
        return "less accurate"
    if not math.isclose(c.time, choice.time, rel_tol=1e-9):
        return "slower"
    return "as fast, less accurate" if _accuracy(c) < _accuracy(choice) else "as fast, listed later"


def plan(
    capacities: Sequence[float],
    switches: SwitchSetLike,
    accuracy: Mapping[SwitchLike, float] | None = None,
    flops: Mapping[SwitchLike, Sequence[float]] | None = None,
    *,
    min_accuracy: float | None = None,
    latency_budget: float | None = None,
    bandwidth: float | None = None,
    exchanged_bytes: Mapping[SwitchLike, float] | None = None,
    memory: float | Sequence[float] | None = None,
    part_bytes: Mapping[SwitchLike, Sequence[float]] | None = None,
) -> Plan:
    """The `Plan` for devices of `capacities` (relative, e.g. ``[2, 1, 1]``, or FLOP/s).

    `flops` gives each switch's FLOPs per part, `exchanged_bytes` its bytes exchanged per image and
    `part_bytes` its weight bytes per part (see `part_costs`). Without `flops` a sub-network of width
    w costs w**2 (the convs between sliced layers dominate and scale with both widths); without
    `bandwidth` communication is not counted, without `exchanged_bytes` it counts as 0. `memory`
    is each device's memory in bytes for the weights, activations not counted (or one number for
    all; needs `part_bytes`, and at most 8 devices, as placements are tried by brute force). Accuracy unknown counts below any known one,
    and excludes the switch when `min_accuracy` is given.
    """
    capacities = [float(c) for c in capacities]
    if not capacities or not all(math.isfinite(c) and c > 0 for c in capacities):
        raise UserError(f"capacities must be positive numbers, one per device, got {capacities}")
    memory = _memory(memory, len(capacities))
    if memory is not None and part_bytes is None:
        raise UserError("memory: give part_bytes too, the weight bytes of every part (see part_costs)")
    bandwidth = None if bandwidth is None else _number("bandwidth", bandwidth, "positive")
    latency_budget = None if latency_budget is None else _number("latency_budget", latency_budget, "positive")
    min_accuracy = None if min_accuracy is None else _number("min_accuracy", min_accuracy)
    switches = SwitchSet.of(switches)
    accuracy = {Switch.parse(k): _number(f"accuracy of {k}", v) for k, v in (accuracy or {}).items()}
    flops, exchanged_bytes, part_bytes = (
        None if table is None else {Switch.parse(k): v for k, v in table.items()}
        for table in (flops, exchanged_bytes, part_bytes)
    )
    eligible, excluded, skipped = [], [], []
    for switch in switches:
        if switch.num_devices > len(capacities):
            skipped.append(switch)
            continue
        costs = [float(w) ** 2 for w in switch.widths] if flops is None else _per_part(flops, "flops", "FLOPs", switch)
        sizes = None if part_bytes is None else _per_part(part_bytes, "part_bytes", "bytes", switch)
        sent = 0.0
        if exchanged_bytes is not None and switch.num_devices > 1:
            if switch not in exchanged_bytes:
                raise ValueError(f"exchanged_bytes: no figure for switch {switch}")
            sent = _number(f"exchanged_bytes of switch {switch}", exchanged_bytes[switch], "non-negative")
        communication = None if bandwidth is None else sent / bandwidth
        found = _place(costs, capacities, sizes, memory)
        known = accuracy.get(switch)
        if found is None:
            why = _memory_shortfall(sizes, memory)
            devices, compute, time, memory_use = (), math.inf, math.inf, None
        else:
            devices, compute = found
            time = compute + (communication or 0.0)
            memory_use = None
            if memory is not None:
                memory_use = max(((sizes[j], memory[d]) for j, d in enumerate(devices)), key=lambda u: u[0] / u[1])
            why = ""
            if min_accuracy is not None and known is None:
                why = "accuracy unknown"
            elif min_accuracy is not None and known < min_accuracy:
                why = f"accuracy {known:.4g} < {min_accuracy:.4g}"
        candidate = Candidate(
            switch,
            tuple(costs),
            devices,
            time,
            known,
            compute,
            communication,
            sent,
            None if sizes is None else tuple(sizes),
            memory_use,
            why,
        )
        (excluded if why else eligible).append(candidate)
    if not eligible:
        if not excluded:
            raise UserError(f"no switch of [{switches}] fits {len(capacities)} device(s)")
        raise UserError("no switch is eligible: " + "; ".join(f"{c.switch}: {c.why}" for c in excluded))
    choice, why = _choose(eligible, latency_budget)
    ranked = sorted(
        (replace(c, why=why if c is choice else _passed_over(c, choice, latency_budget)) for c in eligible),
        key=lambda c: c.time,
    )
    choice = next(c for c in ranked if c.switch == choice.switch)
    notes = _notes(flops is not None, bandwidth, exchanged_bytes is not None, latency_budget, min_accuracy)
    return Plan(choice, tuple(ranked), tuple(skipped), tuple(excluded), notes)


def _notes(
    flops_known: bool,
    bandwidth: float | None,
    bytes_known: bool,
    latency_budget: float | None,
    min_accuracy: float | None,
) -> tuple[str, ...]:
    """How the table's times were counted, and the constraints."""
    notes = ["time = compute + comm (seconds if capacities are in FLOP/s and bandwidth in B/s)"]
    if flops_known:
        notes.append("compute = the slowest device's part FLOPs / its capacity")
    else:
        notes.append("compute = the slowest device's part cost / its capacity (no FLOPs given: cost = width**2)")
    if bandwidth is None:
        notes.append("comm: not modelled (no bandwidth given)")
    else:
        unknown = "" if bytes_known else " (bytes exchanged unknown: counted as 0)"
        notes.append(f"comm = bytes exchanged per image / bandwidth {_si(bandwidth, 'B')} per time unit{unknown}")
    limits = [f"latency budget {latency_budget:.4g}"] if latency_budget is not None else []
    limits += [f"min accuracy {min_accuracy:.4g}"] if min_accuracy is not None else []
    return (*notes, *([", ".join(limits)] if limits else []))
