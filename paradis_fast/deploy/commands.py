"""`python -m paradis_fast plan | export`: deployment from a checkpoint (serving: `paradis_fast.deploy.serve`)."""

from __future__ import annotations

import argparse

from ..errors import UserError


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


def open_checkpoint(path: str):
    """`load_checkpoint`, with a path that cannot be opened reported as a user error."""
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(path)
    except OSError as error:
        raise UserError(f"cannot open checkpoint {path}: {error.strerror or error}") from error


def input_shape(args, checkpoint: dict) -> list[int]:
    """--input-shape, else the checkpoint's, else a clear error."""
    shape = args.input_shape or checkpoint.get("input_shape")
    if shape is None:
        raise UserError("the checkpoint records no input shape; pass --input-shape C,H,W")
    return list(shape)


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint written by paradis_fast.deploy.save_checkpoint")
    p.add_argument(
        "--input-shape",
        type=_positive_list(int, "3,32,32"),
        default=None,
        help="C,H,W of one image (default: the checkpoint's)",
    )


def run_plan(args) -> None:
    from .plan import part_flops, plan

    model, checkpoint = open_checkpoint(args.checkpoint)
    flops = part_flops(model, model.switches, input_shape(args, checkpoint))
    result = plan(args.capacities, model.switches, checkpoint["accuracy"], flops)
    print(f"devices of capacity {', '.join(f'{c:g}' for c in args.capacities)}: run switch {result.switch}")
    print(result.table())


def run_export(args) -> None:
    from .export import export
    from .split import split

    model, checkpoint = open_checkpoint(args.checkpoint)
    manifest = export(
        split(model, args.switch), input_shape(args, checkpoint), args.out, args.format, model_name=checkpoint["model"]
    )
    files = [part["file"] for part in manifest["parts"]] + [manifest["fusion"]["file"]]
    print(f"switch {manifest['switch']} of {checkpoint['model']} -> {args.out}: {', '.join(files)}, manifest.json")


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose the switch whose slowest device finishes first")
    add_checkpoint_arguments(p)
    p.add_argument(
        "--capacities",
        type=_positive_list(float, "2,1,1"),
        required=True,
        help="relative speed of each device, e.g. 2,1,1",
    )
    p.set_defaults(run=run_plan)

    p = subparsers.add_parser("export", help="write a switch's per-device parts, fusion and manifest")
    add_checkpoint_arguments(p)
    p.add_argument("--switch", required=True, help="the switch to export, e.g. 2x0.5")
    p.add_argument("--format", choices=("torch-export", "onnx"), default="torch-export")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=run_export)
