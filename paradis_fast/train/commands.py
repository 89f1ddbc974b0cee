"""`python -m paradis_fast train`: train every switch of a ParaDiS network on bundled data."""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils.data import DataLoader

MODELS = ("mobilenet_v1", "resnet20")


def _switch_list(text: str) -> list[str]:
    """Comma-separated switches, checked at parse time so a typo fails before any work."""
    from ..switches import SwitchSet

    try:
        return [str(s) for s in SwitchSet([w.strip() for w in text.split(",")])]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _build_model(args, split):
    from .. import models

    builder = getattr(models, args.model)
    kwargs = dict(num_classes=split.num_classes, switches=args.switches, in_channels=split.in_channels,
                  width_mult=args.width_mult)
    if args.model == "mobilenet_v1":
        kwargs["small_input"] = True
    return builder(**kwargs)


def train(args) -> dict:
    from . import datasets, fit

    torch.manual_seed(args.seed)
    split = datasets.load(args.dataset, seed=args.seed)
    model = _build_model(args, split)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(split.train, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator)
    val_loader = DataLoader(split.val, batch_size=256)
    print(f"training {args.model} (width {args.width_mult}) on {args.dataset}: {len(split.train)} train / "
          f"{len(split.val)} val images, switches {model.switches}", flush=True)
    accuracy = fit(model, train_loader, val_loader, epochs=args.epochs, lr=args.lr)
    print("final validation accuracy per switch:")
    for switch, acc in accuracy.items():
        print(f"  {switch:>16}  {acc:.4f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump({"switches": {s: {"accuracy": a} for s, a in accuracy.items()}}, f, indent=2)
        torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    return accuracy


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train every switch of a ParaDiS network jointly")
    p.add_argument("--model", choices=MODELS, default="mobilenet_v1")
    p.add_argument("--switches", type=_switch_list,
                   default=["1x1.0", "2x0.5", "4x0.25"], help="comma-separated switches (default: 1x1.0,2x0.5,4x0.25)")
    p.add_argument("--dataset", default="digits", help="bundled dataset (default: digits, scikit-learn's 8x8 digits)")
    p.add_argument("--width-mult", type=float, default=0.5, help="channel multiplier of the full-width network")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle cosine schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for metrics.json and model.pt")
    p.set_defaults(run=train)
