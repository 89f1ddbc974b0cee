"""``python -m paradis_fast train`` and ``python -m paradis_fast calibrate``."""

from __future__ import annotations

import argparse
import os

from .. import memory

MODELS = ("mobilenet_v1", "resnet20", "resnet50", "wdsr_a", "wdsr_b")

TRAIN_HELP = """\
Train every switch of a ParaDiS network jointly (in-place distillation: the widest switch learns
from the labels, the others from it), evaluate every switch after each epoch, and with --out DIR
write DIR/checkpoint.pt (each epoch), DIR/history.csv, DIR/metrics.json and DIR/plots/<switch>.png.
Without flags: a small MobileNet v1 on scikit-learn's digits, about a minute on 2 cores.
Data-parallel: torchrun --nproc_per_node N -m paradis_fast train ... (--batch-size is the global batch).
Super-resolution: --model wdsr_a --dataset photos --optimizer adamw (metric: PSNR; loss: L1 of every
switch against the high-resolution image, no distillation unless --distill-weight is given).
"""


def _switch_list(text: str) -> list[str]:
    """Comma-separated switches, checked at parse time so a typo fails before any work."""
    from ..switches import SwitchSet

    try:
        return [str(s) for s in SwitchSet([w.strip() for w in text.split(",")])]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _width_list(text: str) -> list[str]:
    from ..switches import Switch

    try:
        return [str(Switch.parse(w.strip()).widths[0]) for w in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _print_final(result: dict) -> None:
    metric = next(iter(next(iter(result["switches"].values()))))
    print(f"final validation {metric} per switch:")
    for switch, values in result["switches"].items():
        print(f"  {switch:>16}  {values[metric]:.4f}")
    if "bicubic_psnr" in result:
        print(f"  {'bicubic':>16}  {result['bicubic_psnr']:.4f}")


def train(args) -> dict:
    from .experiment import TrainConfig, run

    memory.configure(args)
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    result = run(TrainConfig(**fields))
    if int(os.environ.get("RANK", "0")) == 0:
        _print_final(result)
    return result


def calibrate(args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from . import datasets
    from .calibrate import calibrate_batch_norm
    from ..deploy.commands import open_checkpoint
    from ..errors import UserError
    from .checkpoint import save
    from .experiment import dataset_arguments, val_loader
    from .trainer import evaluate

    model, checkpoint = open_checkpoint(args.checkpoint)
    config = checkpoint.get("config") or {}
    dataset = args.dataset or config.get("dataset")
    if dataset is None:
        raise UserError("the checkpoint does not name its dataset; give --dataset")
    split = datasets.load(dataset, seed=config.get("seed", 0), **dataset_arguments(config))
    loader = DataLoader(
        split.train,
        batch_size=args.batch_size or config.get("batch_size", 64),
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val = val_loader(split.val)
    before = evaluate(model, val, split.task, split.scale)
    used = calibrate_batch_norm(model, loader, args.batches)
    after = evaluate(model, val, split.task, split.scale)
    print(f"re-estimated BatchNorm statistics of {len(model.switches)} switches on {used} batches of {dataset}")
    for switch in after:
        print(f"  {switch:>16}  {before[switch]:.4f} -> {after[switch]:.4f}")
    checkpoint["state_dict"] = model.state_dict()
    if split.task == "classification":
        checkpoint["accuracy"] = after
    output = args.output or os.path.splitext(args.checkpoint)[0] + ".calibrated.pt"
    save(output, checkpoint)
    print(f"wrote {output}")
    return {"before": before, "after": after}


def register(subparsers) -> None:
    from .baselines import BASELINES
    from .datasets import names
    from .precision import PRECISIONS

    p = subparsers.add_parser(
        "train",
        help="train every switch of a ParaDiS network jointly",
        description=TRAIN_HELP,
    )
    p.add_argument("--model", choices=MODELS, default="mobilenet_v1", help="the network to train")
    p.add_argument(
        "--switches",
        type=_switch_list,
        default=["1x1.0", "2x0.5", "4x0.25"],
        help="comma-separated switches, e.g. 1x1.0,2x0.5,0.5+0.25+0.25 (default: 1x1.0,2x0.5,4x0.25)",
    )
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(names())}")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the square images of imagefolder:PATH (default 224; training: random-resized crops "
        "and flips, validation: shorter side resized to size/0.875, centre crop) and of srfolder:PATH's "
        "high-resolution training patches (default 96); the other datasets have a fixed size and reject it",
    )
    p.add_argument(
        "--scale",
        type=int,
        choices=(2, 3, 4),
        default=None,
        help="super-resolution factor of photos and srfolder:PATH (default: 2)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader processes that decode and augment images, worth it for image folders; 0 reads "
        "them in the training process (memory is pinned when training on a GPU)",
    )
    p.add_argument("--width-mult", type=float, default=0.75, help="channel multiplier of the full-width network")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 0.05 x batch size / 32 for sgd, 1e-3 for adamw)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.05,
        help="fraction of the steps spent in linear warm-up before the cosine decay",
    )
    p.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd", help="SGD with Nesterov momentum 0.9, or AdamW"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="L2 on convolution and linear weights (none on BatchNorm, biases, depthwise)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0, help="for the teacher's cross-entropy")
    p.add_argument(
        "--distill-weight",
        type=float,
        default=None,
        help="weight of the students' distillation loss (default: 1 for classifiers, 0 for super-resolution)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the distillation")
    p.add_argument("--seed", type=int, default=0, help="seeds the data split, initialisation and shuffling")
    p.add_argument("--out", default=None, help="folder for checkpoint.pt, history.csv, metrics.json and plots/")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out's checkpoint.pt; the result is the same as an uninterrupted run",
    )
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default=None,
        help="individual: each switch's structure trained alone; slimmable: a slimmable network (1xW "
        "prefix widths, private BatchNorm each, sandwich rule) with equal-cost widths for --switches; "
        "universally-slimmable: a US-Net (random widths on a 1/32 grid, shared BatchNorm affine, "
        "statistics calibrated per evaluated width)",
    )
    p.add_argument(
        "--slimmable-widths",
        type=_width_list,
        default=None,
        help="with --baseline slimmable: its widths, e.g. 1.0,0.75,0.5,0.25; with universally-slimmable: "
        "the range min,max its widths are drawn from (default: derived from --switches)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp32, or autocast in bf16 / fp16 (fp16 with loss scaling); weights and checkpoints stay fp32 "
        "(default: bf16 where the device has bf16 units -- AMX/AVX512-BF16 CPUs, Ampere+ GPUs -- else fp32)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are off anyway when not on a terminal)")
    memory.add_release_argument(p)
    p.set_defaults(run=train)

    c = subparsers.add_parser(
        "calibrate",
        help="re-estimate each switch's BatchNorm statistics of a checkpoint",
        description=calibrate_batch_norm_doc(),
    )
    c.add_argument("--checkpoint", required=True, help="a checkpoint written by train")
    c.add_argument("--batches", type=int, default=20, help="training batches to average over")
    c.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's training batch size")
    c.add_argument("--dataset", default=None, help="default: the checkpoint's training dataset")
    c.add_argument("--seed", type=int, default=0, help="shuffling of the calibration batches")
    c.add_argument(
        "--output", default=None, help="where to write the calibrated checkpoint (default: CKPT.calibrated.pt)"
    )
    c.set_defaults(run=calibrate)


def calibrate_batch_norm_doc() -> str:
    from .calibrate import __doc__ as doc

    return doc
