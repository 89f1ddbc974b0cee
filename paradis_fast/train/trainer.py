"""The training loop: every active switch in one forward and one backward per step.

`Trainer` owns the model, loss, optimizer, schedule and data; it evaluates every switch after each
epoch and calls ``on_epoch_end`` (checkpointing, reports) with the epoch's record.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..nn import SwitchBatchNorm2d
from ..switches import SwitchSetLike
from .loss import InplaceDistillationLoss
from .precision import Precision

METRICS = {"classification": "accuracy", "super_resolution": "psnr"}


def psnr(output: torch.Tensor, target: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] (output clamped), per image over ``[..., C, H, W]``, ignoring a
    ``shave``-pixel border as super-resolution papers do."""
    if shave:
        output, target = output[..., shave:-shave, shave:-shave], target[..., shave:-shave, shave:-shave]
    mse = (output.clamp(0, 1) - target).pow(2).mean((-3, -2, -1))
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: str = "classification",
    scale: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Every active switch's validation metric: top-1 accuracy, or mean PSNR (dB) for super-resolution."""
    model.eval()
    total, count = None, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = model(inputs).float()
        if task == "classification":
            score = (outputs.argmax(-1) == targets).sum(-1).double()
        else:
            score = psnr(outputs, targets, shave=scale).sum(-1).double()
        total = score if total is None else total + score
        count += len(targets)
    return {str(switch): total[s].item() / count for s, switch in enumerate(model.active)}


NORMALISATIONS = (SwitchBatchNorm2d, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _decays(module: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``module`` takes weight decay: not biases, not normalisation
    parameters, not depthwise filters (9 weights per channel: decay shrinks them towards nothing,
    the usual exception in MobileNet and slimmable-network training)."""
    depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
    return not (name.endswith("bias") or isinstance(module, NORMALISATIONS) or depthwise)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The model's parameters as two optimizer groups: with ``weight_decay``, and without (see `_decays`)."""
    groups: dict[bool, dict[int, nn.Parameter]] = {True: {}, False: {}}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            groups[_decays(module, name)].setdefault(id(parameter), parameter)
    return [
        {"params": list(groups[True].values()), "weight_decay": weight_decay},
        {"params": list(groups[False].values()), "weight_decay": 0.0},
    ]


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum 0.9) or AdamW over `parameter_groups`."""
    groups = parameter_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/warmup_steps to lr, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Trains ``model`` (or its DDP wrapper ``module``) epoch by epoch.

    ``choose_switches(generator)``, if given, returns the switches to run at each step (the sandwich
    rule of slimmable networks); the loss's teacher follows the widest of them. ``generator`` drives
    every random choice of the loop (shuffling too, unless the loader has its own sampler), so its
    state in a checkpoint makes a resumed run repeat an uninterrupted one. ``precision`` (default
    float32) runs the forward passes under autocast and scales the loss where float16 needs it.
    ``evaluate_switches`` (default: all) are those evaluated after each epoch, ``calibrate(model)``,
    if given, re-estimates their BatchNorm statistics first (universally slimmable networks: a width
    updates its running statistics only at the steps that happen to draw it, so they lag behind).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        train: DataLoader,
        val: DataLoader,
        task: str = "classification",
        scale: int = 1,
        generator: torch.Generator | None = None,
        module: nn.Module | None = None,
        choose_switches: Callable | None = None,
        progress: bool = False,
        log=print,
        device: torch.device | str = "cpu",
        precision: Precision | None = None,
        evaluate_switches: SwitchSetLike | None = None,
        calibrate: Callable[[nn.Module], object] | None = None,
    ):
        self.model, self.module, self.device = model, module or model, torch.device(device)
        self.precision = precision or Precision("fp32", self.device)
        self.criterion, self.optimizer, self.scheduler = criterion, optimizer, scheduler
        self.train_loader, self.val_loader, self.task, self.scale = train, val, task, scale
        self.generator = generator or torch.Generator().manual_seed(0)
        self.choose_switches, self.progress, self.log = choose_switches, progress, log
        self.evaluate_switches, self.calibrate = evaluate_switches, calibrate
        self.epoch, self.history = 0, []

    @property
    def metric(self) -> str:
        return METRICS[self.task]

    def _bar(self, epochs: int):
        from tqdm import tqdm

        enabled = self.progress and sys.stderr.isatty()
        return tqdm(
            self.train_loader,
            desc=f"epoch {self.epoch + 1}/{epochs}",
            leave=False,
            disable=not enabled,
            dynamic_ncols=True,
        )

    def train_epoch(self, epochs: int) -> dict:
        """One pass over the training data; returns the mean loss, images/s and final learning rate."""
        self.module.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        start, seen, total_loss = time.perf_counter(), 0, 0.0
        skipped = self.precision.skipped_steps
        bar = self._bar(epochs)
        for inputs, targets in bar:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            if self.choose_switches is not None:
                self.model.set_active(self.choose_switches(self.generator))
            self.criterion.teacher = self.model.active.widest
            with self.precision.autocast():
                loss = self.criterion(self.module(inputs), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward_and_step(loss, self.optimizer)
            self.scheduler.step()
            seen += len(targets)
            total_loss += loss.item() * len(targets)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        bar.close()
        self.model.set_active(None)
        return {
            "loss": total_loss / max(seen, 1),
            "images_per_s": seen / (time.perf_counter() - start),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_steps": self.precision.skipped_steps - skipped,
        }

    def evaluate(self) -> dict[str, float]:
        self.model.set_active(self.evaluate_switches)
        try:
            with self.precision.autocast():
                if self.calibrate is not None:
                    self.calibrate(self.model)
                return evaluate(self.model, self.val_loader, self.task, self.scale, self.device)
        finally:
            self.model.set_active(None)

    def unreadable_files(self) -> int:
        """Image files skipped so far because they cannot be decoded (datasets that read files count them)."""
        return sum(getattr(loader.dataset, "unreadable", 0) for loader in (self.train_loader, self.val_loader))

    def fit(self, epochs: int, on_epoch_end: Callable | None = None) -> dict[str, float]:
        """Train from ``self.epoch`` up to ``epochs``; returns the last evaluation of every switch."""
        scores = self.history[-1]["switches"] if self.history else {}
        while self.epoch < epochs:
            record = self.train_epoch(epochs)
            scores = self.evaluate()
            self.epoch += 1
            record = {"epoch": self.epoch, **record, "switches": scores}
            self.history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(self)
            unit = "%" if self.task == "classification" else " dB"
            factor = 100 if self.task == "classification" else 1
            shown = "  ".join(f"{name} {value * factor:.2f}{unit}" for name, value in scores.items())
            skipped, unreadable = record["skipped_steps"], self.unreadable_files()
            self.log(
                f"epoch {self.epoch}/{epochs}  loss {record['loss']:.4f}  {record['images_per_s']:.0f} img/s  "
                f"val {self.metric}  {shown}"
                + (f"  ({skipped} steps skipped: inf/nan gradients)" if skipped else "")
                + (f"  (skipped {unreadable} unreadable file{'s' * (unreadable != 1)})" if unreadable else "")
            )
        return scores

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "precision": self.precision.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        if "precision" in state:  # checkpoints written before --precision trained in float32
            self.precision.load_state_dict(state["precision"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])


def fit(
    model,
    train: DataLoader,
    val: DataLoader,
    epochs: int,
    lr: float,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    criterion: nn.Module | None = None,
    warmup: float = 0.05,
    log=print,
) -> dict[str, float]:
    """Train a classifier's switches with in-place distillation, warm-up + cosine; final accuracies."""
    optimizer = make_optimizer(optimizer, model, lr, weight_decay)
    total = epochs * len(train)
    scheduler = warmup_cosine(optimizer, total, max(1, int(warmup * total)))
    trainer = Trainer(model, criterion or InplaceDistillationLoss(), optimizer, scheduler, train, val, log=log)
    return trainer.fit(epochs)
