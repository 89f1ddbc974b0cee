"""`python -m paradis_fast plan | export`: deployment from a checkpoint (serving: `paradis_fast.deploy.serve`)."""

from __future__ import annotations

import argparse
import math
import re
from typing import Sequence

from ..errors import UserError

_SIZE = re.compile(r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _positive_list(cast, example: str):
    """An argparse type: comma-separated positive numbers, e.g. ``2,1,1``."""

    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list such as {example}") from None
        if not all(v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be positive")
        return values

    return parse


def _sizes(text: str) -> list[float]:
    """An argparse type: comma-separated positive byte counts, e.g. ``8MB,512MiB`` or ``8000000``."""
    values = []
    for item in text.split(","):
        match = _SIZE.match(item)
        if match is None:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a size such as 8MB, 512KiB or 8000000")
        number, unit = match.groups()
        values.append(float(number) * _SIZE_UNITS.get((unit or "").lower(), 1))
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be positive")
    return values


def _size(text: str) -> float:
    """An argparse type: one positive byte count, e.g. ``125MB``."""
    values = _sizes(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one size, not a list")
    return values[0]


def _positive(text: str) -> float:
    """An argparse type: one positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number")
    return value


def open_checkpoint(path: str):
    """`load_checkpoint`, with a path that cannot be opened reported as a user error."""
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except OSError as error:
        raise UserError(f"cannot open checkpoint {path}: {error.strerror or error}") from error


def input_shape(args, recorded: Sequence[int] | None) -> list[int]:
    """--input-shape, else the one the checkpoint (or parts directory) records, else a clear error."""
    shape = args.input_shape or recorded
    if shape is None:
        raise UserError("the checkpoint records no input shape; pass --input-shape C,H,W")
    return list(shape)


def add_checkpoint_arguments(p: argparse.ArgumentParser, parts: bool = False) -> None:
    """--checkpoint and --input-shape; with `parts`, --parts DIR as the alternative to --checkpoint."""
    source = p.add_mutually_exclusive_group(required=True) if parts else p
    source.add_argument(
        "--checkpoint", required=not parts, help="checkpoint written by paradis_fast.deploy.save_checkpoint"
    )
    if parts:
        source.add_argument(
            "--parts",
            default=None,
            help="directory written by export --format parts: each process loads only its part's file",
        )
    p.add_argument(
        "--input-shape",
        type=_positive_list(int, "3,32,32"),
        default=None,
        help="C,H,W of one image (default: the checkpoint's)",
    )


def run_plan(args) -> None:
    from .plan import part_costs, plan

    model, checkpoint = open_checkpoint(args.checkpoint)
    costs = part_costs(model, model.switches, input_shape(args, checkpoint["input_shape"]))
    memory = args.memory[0] if args.memory is not None and len(args.memory) == 1 else args.memory
    result = plan(
        args.capacities,
        model.switches,
        checkpoint["accuracy"],
        costs.flops,
        min_accuracy=args.min_accuracy,
        latency_budget=args.latency_budget,
        bandwidth=args.bandwidth,
        exchanged_bytes=costs.exchanged_bytes,
        memory=memory,
        part_bytes=costs.part_bytes,
    )
    print(f"devices of capacity {', '.join(f'{c:g}' for c in args.capacities)}: run switch {result.switch}")
    print(result.table())


def run_export(args) -> None:
    from .export import export
    from .parts import export_parts
    from .split import split

    model, checkpoint = open_checkpoint(args.checkpoint)
    shape = input_shape(args, checkpoint["input_shape"])
    switches = model.switches if args.all_switches else args.switch.split(",")
    if args.format == "parts":
        manifest = export_parts(
            model, switches, shape, args.out, checkpoint["model"], checkpoint["kwargs"], checkpoint["accuracy"]
        )
        exported = manifest["exported"]
    else:
        if len(switches) != 1:
            raise UserError(f"--format {args.format} writes one switch; give one --switch (several: --format parts)")
        manifest = export(split(model, switches[0]), shape, args.out, args.format, model_name=checkpoint["model"])
        exported = {manifest["switch"]: manifest}
    files = [entry["file"] for switch in exported.values() for entry in (*switch["parts"], switch["fusion"])]
    print(f"switch {', '.join(exported)} of {checkpoint['model']} -> {args.out}: {', '.join(files)}, manifest.json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="choose the switch: the fastest, or the most accurate within a latency budget"
    )
    add_checkpoint_arguments(p)
    p.add_argument(
        "--capacities",
        type=_positive_list(float, "2,1,1"),
        required=True,
        help="speed of each device, relative (2,1,1) or in FLOP/s (2e9,1e9,1e9: times are then in seconds)",
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="exclude switches whose accuracy in the checkpoint is below this or unknown",
    )
    p.add_argument(
        "--latency-budget",
        type=_positive,
        default=None,
        help="time per image allowed, in the capacities' unit (seconds for FLOP/s): the most accurate switch "
        "within it wins",
    )
    p.add_argument(
        "--bandwidth",
        type=_size,
        default=None,
        help="bytes per time unit between devices, e.g. 125MB (per second for FLOP/s capacities); "
        "default: communication not counted",
    )
    p.add_argument(
        "--memory",
        type=_sizes,
        default=None,
        help="memory of each device for the weights, e.g. 8MB or 8MB,4MB,4MB (one per device; kB, MB, GB, "
        "KiB, MiB, GiB or bytes)",
    )
    p.set_defaults(run=run_plan)

    p = subparsers.add_parser("export", help="write a switch's per-device parts, fusion and manifest")
    add_checkpoint_arguments(p)
    switches = p.add_mutually_exclusive_group(required=True)
    switches.add_argument(
        "--switch",
        help="the switch to export, e.g. 2x0.5; with --format parts a list, e.g. 4x0.25,2x0.5,1x1.0: every "
        "switch the fault-tolerant server may re-plan to",
    )
    switches.add_argument("--all-switches", action="store_true", help="every switch of the checkpoint (--format parts)")
    p.add_argument(
        "--format",
        choices=("torch-export", "onnx", "parts"),
        default="torch-export",
        help="parts: the files serve --parts runs (each part's weights, the fusion's, a manifest)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run_export)
