"""Per-image latency of a ParaDiS MobileNet v1 served over torch.distributed (gloo, CPU).

`1x1.0` on one process (the dense network: plain PyTorch convs with BatchNorm folded in, the
best plain-PyTorch baseline, also timed as the ParaDiS model's own eval forward) against `2x0.5`
on 2 processes and `4x0.25` on 4, one thread per process, batch 1, every process keeping freed
memory as the server's CLI does. Each run times its own 1x1.0 baseline, interleaved with the
distributed requests, so a shared machine's load hits both alike; each timed request follows an
untimed one of the same kind (a server's steady state). A request is a uint8 camera frame,
decoded to float on each device (the dense baseline decodes it too). A distributed request is
timed end to end on rank 0: broadcast of the frame, each rank's part, one gather of the partial
outputs (posted by the root before its own part), the fusion; and again without the broadcast,
for devices that each receive the frame (a camera multicasting it); and each rank's part alone,
all ranks at once, no exchange (what sharing the machine costs the compute). Bytes exchanged per
image = frame sent to the other ranks + their partials.

    OMP_NUM_THREADS=1 python bench/deploy.py [--iters 30] [--csv out.csv]

With fewer cores than processes the ranks share cores and the numbers say so; read them as what
this machine measured.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paradis_fast import memory
from paradis_fast.deploy import split
from paradis_fast.deploy.serve import DistributedSplit
from paradis_fast.models import mobilenet_v1

SWITCHES = ("1x1.0", "2x0.5", "4x0.25")
CASES = {
    "224px": dict(num_classes=1000, small_input=False, size=224),
    "small_input 32px": dict(num_classes=10, small_input=True, size=32),
}


def build(case: str):
    config = CASES[case]
    torch.manual_seed(0)
    model = mobilenet_v1(config["num_classes"], SWITCHES, small_input=config["small_input"]).eval()
    return model, (3, config["size"], config["size"])


def camera_frame(shape) -> torch.Tensor:
    """A request as a camera delivers it: one uint8 frame (4x fewer bytes on the wire than float32)."""
    return torch.randint(0, 256, (1, *shape), dtype=torch.uint8)


def decode(frame: torch.Tensor) -> torch.Tensor:
    """The model's input from a frame, on each device (part of every timed request, dense too)."""
    return frame.to(torch.float32).div_(255)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _steady(request, sync=lambda: None) -> float:
    """Seconds of a request that follows one like it: a server's steady state, with its weights in
    cache (the request timed before it, another model's, would otherwise have evicted them).
    ``sync`` lines the processes up between the two, so no rank starts the timed one early."""
    request()
    sync()
    return _seconds(request)


def _rank(
    rank: int, world: int, port: int, case: str, switch: str, warmup: int, iters: int, results, release: bool
) -> None:
    """One process of a `world`-process run. Rank 0 times, interleaved round by round so all
    meet the same machine load: the dense 1x1.0 alone on rank 0 (the others wait), the request
    with the image broadcast, the request with the image already on every rank, and every rank's
    part at once without the exchange."""
    torch.set_num_threads(1)
    if not release:
        memory.cache_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, shape = build(case)
        runner, dense = DistributedSplit(split(model, switch), preprocess=decode), split(model, "1x1.0")
        frame = camera_frame(shape)
        requests = {
            "dense": lambda: dense(decode(frame)) if rank == 0 else None,
            "sent": lambda: runner(frame, broadcast=True),
            "local": lambda: runner(frame, broadcast=False),
            "parts": lambda: runner.part(decode(frame)),
        }
        samples = {key: [] for key in requests}
        with torch.no_grad():
            for round_ in range(warmup + iters):
                times = {}
                for key, request in requests.items():
                    times[key] = _steady(request, dist.barrier)
                    dist.barrier()
                if round_ >= warmup:
                    for key, value in times.items():
                        samples[key].append(value)
        if rank == 0:
            results.put({key: statistics.median(values) for key, values in samples.items()})
    finally:
        dist.destroy_process_group()


def distributed_latency(case: str, switch: str, world: int, warmup: int, iters: int, release: bool) -> dict[str, float]:
    """Median seconds per request on rank 0 (see `_rank`)."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        _rank, (world, _free_port(), case, switch, warmup, iters, results, release), nprocs=world, start_method="spawn"
    )
    return results.get()


def single_process_latency(case: str, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds, interleaved on one process: the dense 1x1.0, the ParaDiS model's own 1x1.0
    forward, and part 0 of each switch alone (the compute a device does, without communication)."""
    model, shape = build(case)
    model.set_active(["1x1.0"])
    frame = camera_frame(shape)
    parts = {switch: split(model, switch).parts[0] for switch in SWITCHES}
    samples = {"dense": [], "paradis": [], **{switch: [] for switch in SWITCHES}}
    with torch.no_grad():
        for round_ in range(warmup + iters):
            times = {
                "dense": _steady(lambda: parts["1x1.0"](decode(frame))),
                "paradis": _steady(lambda: model(decode(frame))),
                **{switch: _steady(lambda: part(decode(frame))) for switch, part in parts.items()},
            }
            if round_ >= warmup:
                for key, value in times.items():
                    samples[key].append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--csv", default=None)
    memory.add_release_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    memory.configure(args)  # as the server's CLI does, in every process
    rows = []
    for case in CASES:
        model, shape = build(case)
        image_bytes = camera_frame(shape).numel()
        single = single_process_latency(case, args.warmup, args.iters)
        rows.append(
            dict(
                case=case,
                switch="1x1.0 (ParaDiS model)",
                processes=1,
                dense_ms=single["dense"] * 1e3,
                ms=single["paradis"] * 1e3,
                ratio=single["paradis"] / single["dense"],
                ms_local="-",
                ratio_local="-",
                part_ratio="-",
                parts_ratio="-",
                bytes=0,
                gflops="-",
            )
        )
        for switch, world in zip(SWITCHES, (1, 2, 4)):
            stats = split(model, switch).stats(shape)
            if world == 1:
                timed = dict(single, sent=single["dense"], local=single["dense"], parts=single["1x1.0"])
            else:
                timed = distributed_latency(case, switch, world, args.warmup, args.iters, args.release_freed_memory)
            exchanged = (world - 1) * image_bytes + sum(s.bytes_sent for s in stats[1:])
            rows.append(
                dict(
                    case=case,
                    switch=switch,
                    processes=world,
                    dense_ms=timed["dense"] * 1e3,
                    ms=timed["sent"] * 1e3,
                    ratio=timed["sent"] / timed["dense"],
                    ms_local=f"{timed['local'] * 1e3:.2f}",
                    ratio_local=f"{timed['local'] / timed['dense']:.2f}",
                    part_ratio=f"{single[switch] / single['dense']:.2f}",
                    parts_ratio=f"{timed['parts'] / timed['dense']:.2f}",
                    bytes=exchanged,
                    gflops="/".join(f"{s.flops / 1e9:.3f}" for s in stats),
                )
            )
    print(
        f"MobileNet v1, batch 1, one thread per process, {os.cpu_count()} CPU cores, gloo; median of {args.iters} "
        "rounds; ratio = latency / latency of 1x1.0 dense on one process, timed in the same run, interleaved\n"
    )
    print(
        "| input | switch | processes | 1x1.0 dense, ms | ms / image | ratio | ms, image on every rank | ratio | "
        "part 0 alone, ratio | part 0 beside the others' parts, ratio | bytes exchanged / image | GFLOPs per part |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['switch']} | {r['processes']} | {r['dense_ms']:.2f} | {r['ms']:.2f} | "
            f"{r['ratio']:.2f} | {r['ms_local']} | {r['ratio_local']} | {r['part_ratio']} | {r['parts_ratio']} | "
            f"{r['bytes']} | {r['gflops']} |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
