"""Serve a split switch over torch.distributed: rank j runs part j, one collective sums the partials.

Launch one process per device, e.g. ``torchrun --nproc_per_node 2 -m paradis_fast.deploy.serve
--checkpoint CKPT --switch 2x0.5``. With ``--parts DIR`` (written by ``export --format parts``)
instead of ``--checkpoint``, rank j loads only part j's file (the root also the fusion's), never
the whole model. With ``--fault-tolerant`` the processes talk through a TCPStore instead
(`paradis_fast.deploy.failover`), so a device that dies or hangs is dropped and the switch
re-planned; launch those processes one by one (torchrun's agent stops every process when one
fails), giving each ``--rank``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import memory
from ..errors import UserError, reported_as_one_line
from ..switches import Switch, SwitchLike
from .parts import ModelParts, PartsDir
from .split import Split

PROG = "python -m paradis_fast.deploy.serve"

__all__ = ["DistributedSplit", "DistributedParts", "main"]


class DistributedSplit:
    """One process of a split switch on the default process group: rank j holds part j only.

    Every rank calls it with an image tensor of the same shape; with ``broadcast=True`` the root's
    image is broadcast first (the others' tensors are overwritten). ``preprocess``, if given, runs
    on every rank after the broadcast, so a compact frame (e.g. uint8, 4x fewer bytes than float32)
    travels and each device decodes it. The partial outputs meet in one ``gather`` on the root,
    which sums them in rank order, adds the fusion and returns the output; other ranks return None.
    The root posts its gather before computing its own part, so the others' partials arrive while
    it computes (a blocking ``reduce`` after the compute costs more per request over gloo).
    """

    def __init__(self, split: Split, root: int = 0, preprocess: Callable[[Tensor], Tensor] | None = None):
        self._join(split.switch, root, preprocess)
        self.part, self.fusion = split.parts[self.rank], split.fusion

    def _join(self, switch: Switch, root: int, preprocess: Callable[[Tensor], Tensor] | None) -> None:
        world = dist.get_world_size()
        if world != switch.num_devices:
            raise ValueError(
                f"switch {switch} has {switch.num_devices} parts but the process group has "
                f"{world} ranks; launch one process per part"
            )
        self.rank, self.root, self.world, self.preprocess = dist.get_rank(), root, world, preprocess
        self._slots: dict[tuple, list[Tensor]] = {}  # root: gather buffers per image shape and dtype

    @torch.no_grad()
    def __call__(self, image: Tensor, broadcast: bool = True) -> Tensor | None:
        if broadcast:
            dist.broadcast(image, src=self.root)
        frame = image
        if self.preprocess is not None:
            image = self.preprocess(frame)
        if self.rank != self.root:
            dist.gather(self.part(image).contiguous(), dst=self.root)
            return None
        slots = self._slots.get((frame.shape, frame.dtype))
        if slots is None:  # the first request of this shape tells the partials' shape
            partial = self.part(image).contiguous()
            slots = self._slots[(frame.shape, frame.dtype)] = [torch.empty_like(partial) for _ in range(self.world)]
            dist.gather(partial, slots, dst=self.root)
        else:  # slots[root] only receives the root's own placeholder contribution
            pending = dist.gather(slots[self.root], slots, dst=self.root, async_op=True)
            partial = self.part(image)
            pending.wait()
        first, *rest = [partial if rank == self.root else slot for rank, slot in enumerate(slots)]
        total = first.clone()
        for contribution in rest:
            total += contribution
        return self.fusion(total, image)


class DistributedParts(DistributedSplit):
    """`DistributedSplit` of `switch` taken part by part from `parts`: rank j asks only for part j,
    and only the root for the fusion, so from a `PartsDir` each process loads just its files."""

    def __init__(
        self,
        parts: ModelParts | PartsDir,
        switch: SwitchLike,
        root: int = 0,
        preprocess: Callable[[Tensor], Tensor] | None = None,
    ):
        switch = Switch.parse(switch)
        self._join(switch, root, preprocess)
        self.part = parts.part(switch, self.rank)
        self.fusion = parts.fusion(switch) if self.rank == root else None


def _arguments(argv) -> argparse.Namespace:
    from ..cli import add_debug_argument
    from .commands import add_checkpoint_arguments

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(p, parts=True)
    p.add_argument("--switch", default=None, help="switch to serve (default with --fault-tolerant: planned)")
    p.add_argument("--batches", type=int, default=8, help="number of random request batches to serve")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="rank 0 saves the images and outputs here (torch.save)")
    p.add_argument("--fault-tolerant", action="store_true", help="serve through a TCPStore and survive lost devices")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a device's partial output")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    p.add_argument("--store-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument(
        "--store-port",
        type=int,
        default=int(os.environ.get("MASTER_PORT", 29500)) + 1,
        help="TCPStore port for --fault-tolerant (default MASTER_PORT + 1)",
    )
    memory.add_release_argument(p)
    add_debug_argument(p)
    return p.parse_args(argv)


def _requests(args, shape):
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.randn(args.batch_size, *shape, generator=generator) for _ in range(args.batches)]


def _serve_collective(args, parts: ModelParts | PartsDir, shape) -> list:
    if args.switch is None:
        raise UserError("--switch is required without --fault-tolerant")
    dist.init_process_group("gloo")
    try:
        runner = DistributedParts(parts, args.switch)
        served, start = [], time.perf_counter()
        # the root's images are broadcast into the other ranks' buffers
        images = _requests(args, shape) if runner.rank == 0 else [torch.empty(args.batch_size, *shape)] * args.batches
        for image in images:
            output = runner(image)
            if output is not None:
                served.append((image, output, args.switch))
        if runner.rank == 0:
            per_image = (time.perf_counter() - start) / (args.batches * args.batch_size)
            print(
                f"served {args.batches} batches of {args.batch_size} images on switch {args.switch} over "
                f"{dist.get_world_size()} processes: {per_image * 1e3:.2f} ms per image"
            )
        return served
    finally:
        dist.destroy_process_group()


def _serve_fault_tolerant(args, parts: ModelParts | PartsDir, accuracy, shape) -> list:
    from .failover import Coordinator, run_worker

    store = dist.TCPStore(
        args.store_addr,
        args.store_port,
        is_master=args.rank == 0,
        wait_for_workers=False,
        timeout=timedelta(seconds=max(60.0, args.timeout)),
    )
    if args.rank != 0:
        run_worker(store, args.rank, parts)
        return []
    coordinator = Coordinator(
        store,
        parts,
        range(1, args.world_size),
        shape,
        timeout=args.timeout,
        accuracy=accuracy,
        switch=args.switch,
    )
    try:
        served = []
        for image in _requests(args, shape):
            answer = coordinator.infer(image)
            served.append((image, answer.output, str(answer.switch)))
        used = ", ".join(dict.fromkeys(switch for *_, switch in served))
        print(f"served {args.batches} batches of {args.batch_size} images; switches used: {used}")
        return served
    finally:
        coordinator.close()


def main(argv=None) -> int:
    from .commands import input_shape, open_checkpoint

    args = _arguments(argv)
    memory.configure(args)
    with reported_as_one_line(PROG, args.debug):
        if args.parts is not None:
            parts = PartsDir(args.parts, log=lambda line: print(f"rank {args.rank}: {line}", flush=True))
            recorded, accuracy = parts.input_shape, parts.accuracy
        else:
            model, checkpoint = open_checkpoint(args.checkpoint)
            parts, recorded, accuracy = ModelParts(model), checkpoint["input_shape"], checkpoint["accuracy"]
        shape = input_shape(args, recorded)
        if args.fault_tolerant:
            served = _serve_fault_tolerant(args, parts, accuracy, shape)
        else:
            served = _serve_collective(args, parts, shape)
    if served and args.out:
        torch.save([dict(image=i, output=o, switch=s) for i, o, s in served], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
