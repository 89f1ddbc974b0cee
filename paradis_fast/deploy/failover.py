"""Fault-tolerant serving: a coordinator and workers exchanging requests through a TCPStore.

A gloo collective with a dead member cannot be recovered, so this path uses no collective. The
coordinator (rank 0, the store's host and itself a device) plans a switch for the live ranks,
writes each request's image to the queue ``job/<rank>/<n>`` of every rank that runs a part, runs
its own part, and waits for the partial outputs ``result/<job>/<rank>`` up to `timeout` seconds.
A rank whose partial is late is dropped, the switch re-planned for the survivors and the same
request sent again as a new job, so every request is answered on the switch that served it and
nothing late is ever mixed in (results carry their job id). Workers leave when told to stop
(and say so, so the coordinator keeps the store up until then); if the coordinator's store goes
away they stop with torch.distributed.DistNetworkError. Given an exported `PartsDir` instead of
the model, each process loads a part's file when it is first asked to run that part, and drops
the part it ran before: the directory must hold every switch that re-planning may choose.
"""

from __future__ import annotations

import io
import itertools
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from ..nn import Switchable
from ..switches import Switch, SwitchLike
from .parts import PartsDir, parts_of
from .plan import plan

__all__ = ["Coordinator", "Answer", "run_worker"]

COORDINATOR = 0


def _dump(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


@dataclass(frozen=True)
class Answer:
    output: torch.Tensor
    switch: Switch
    ranks: tuple[int, ...]  # rank that ran each part
    retries: int  # attempts lost to devices that dropped out


def run_worker(store: dist.Store, rank: int, model: Switchable | PartsDir, idle_wait: float = 30.0) -> None:
    """Announce `rank`, then run the parts the coordinator asks for until it says stop or goes away."""
    parts = parts_of(model)
    store.set(f"alive/{rank}", b"1")
    for n in itertools.count():
        key = f"job/{rank}/{n}"
        while True:
            try:
                store.wait([key], timedelta(seconds=idle_wait))
                break
            except dist.DistStoreError:  # idle; a vanished coordinator raises DistNetworkError instead
                continue
        job = _load(store.get(key))
        store.delete_key(key)
        if job["stop"]:
            store.set(f"stopped/{rank}", b"1")
            return
        with torch.no_grad():
            partial = parts.part(job["switch"], job["part"])(job["image"])
        store.set(f"result/{job['id']}/{rank}", _dump(partial))


class Coordinator:
    """Rank 0's side: plans, sends requests, collects and fuses partial outputs, drops lost devices.

    `workers` are the other ranks; those that do not announce themselves within `startup` seconds
    start out dropped; afterwards a rank is dropped when its partial output is `timeout` seconds
    late. `capacities` maps rank -> relative speed (default 1 each); the switch is planned among
    the model's switches (a `PartsDir`'s: those exported) from their FLOPs per part for images of
    `input_shape`, unless `switch` is given (used until the first drop-out).
    """

    def __init__(
        self,
        store: dist.Store,
        model: Switchable | PartsDir,
        workers: Iterable[int],
        input_shape: Sequence[int],
        timeout: float = 5.0,
        startup: float = 60.0,
        capacities: Mapping[int, float] | None = None,
        accuracy: Mapping[str, float] | None = None,
        switch: SwitchLike | None = None,
        log=print,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.store, self.parts, self.timeout, self.log = store, parts_of(model), timeout, log
        self.workers = sorted(set(workers) - {COORDINATOR})
        self.capacities = {rank: 1.0 for rank in [COORDINATOR, *self.workers]} | dict(capacities or {})
        self.accuracy, self.flops = accuracy, self.parts.flops(input_shape)
        self.sent = {rank: 0 for rank in self.workers}
        self.jobs = itertools.count()
        self.alive = [COORDINATOR, *self._announced(startup)]
        self._replan(switch)

    def _announced(self, startup: float) -> list[int]:
        deadline, alive = time.monotonic() + startup, []
        for rank in self.workers:
            try:
                self.store.wait([f"alive/{rank}"], timedelta(seconds=max(1e-3, deadline - time.monotonic())))
                alive.append(rank)
            except dist.DistStoreError:
                self.log(f"rank {rank} did not announce itself within {startup}s; serving without it")
        return alive

    def _replan(self, switch: SwitchLike | None = None) -> None:
        """Choose the switch for the live ranks and place part j on rank ``self.ranks[j]``."""
        capacities = [self.capacities[rank] for rank in self.alive]
        if switch is not None:
            switch = Switch.parse(switch)
            if switch not in self.flops:
                raise UserError(f"switch {switch} is not among those served: {', '.join(map(str, self.flops))}")
            if switch.num_devices > len(self.alive):
                raise ValueError(f"switch {switch} needs {switch.num_devices} devices, {len(self.alive)} are live")
            choice = plan(capacities, [switch], flops={switch: self.flops[switch]}).choice
        else:
            choice = plan(capacities, self.parts.switches, self.accuracy, self.flops).choice
        self.switch = choice.switch
        self.ranks = tuple(self.alive[device] for device in choice.devices)
        self.log(f"serving switch {self.switch} on ranks {list(self.ranks)}")

    def _attempt(self, image: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """The fused output, or None and the ranks whose partial did not arrive in time."""
        job, switch = next(self.jobs), str(self.switch)
        for part, rank in enumerate(self.ranks):
            if rank != COORDINATOR:
                request = dict(stop=False, id=job, switch=switch, part=part, image=image)
                self.store.set(f"job/{rank}/{self.sent[rank]}", _dump(request))
                self.sent[rank] += 1
        with torch.no_grad():
            partials = {
                rank: self.parts.part(switch, j)(image) for j, rank in enumerate(self.ranks) if rank == COORDINATOR
            }
        deadline, late = time.monotonic() + self.timeout, []
        for rank in self.ranks:
            if rank in partials:
                continue
            key = f"result/{job}/{rank}"
            try:
                self.store.wait([key], timedelta(seconds=max(1e-3, deadline - time.monotonic())))
            except dist.DistStoreError:
                late.append(rank)
                continue
            partials[rank] = _load(self.store.get(key))
            self.store.delete_key(key)
        if late:
            return None, late
        return self.parts.fusion(switch).fuse([partials[rank] for rank in self.ranks], image), []

    def infer(self, image: torch.Tensor) -> Answer:
        """Serve one request, re-planning onto the surviving ranks as often as devices drop out."""
        retries = 0
        while True:
            output, late = self._attempt(image)
            if output is not None:
                return Answer(output, self.switch, self.ranks, retries)
            self.log(f"ranks {late} sent no partial output within {self.timeout}s; dropping them")
            self.alive = [rank for rank in self.alive if rank not in late]
            self._replan()
            retries += 1

    def close(self) -> None:
        """Tell every worker, live or dropped, to stop; wait up to `timeout` for the live ones."""
        for rank in self.workers:
            self.store.set(f"job/{rank}/{self.sent[rank]}", _dump(dict(stop=True)))
            self.sent[rank] += 1
        live = [f"stopped/{rank}" for rank in self.alive if rank != COORDINATOR]
        try:
            if live:
                self.store.wait(live, timedelta(seconds=self.timeout))
        except dist.DistStoreError:
            self.log("some workers did not confirm they stopped")
