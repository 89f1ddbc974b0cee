"""A plain training loop over all switches at once: one forward, one backward per step."""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from .loss import InplaceDistillationLoss


@torch.no_grad()
def evaluate(model, loader: DataLoader) -> dict[str, float]:
    """Top-1 accuracy of every active switch."""
    model.eval()
    correct, total = None, 0
    for images, labels in loader:
        hits = (model(images).argmax(-1) == labels).sum(-1)
        correct = hits if correct is None else correct + hits
        total += len(labels)
    return {str(switch): correct[s].item() / total for s, switch in enumerate(model.active)}


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adamw'")


def fit(model, train: DataLoader, val: DataLoader, epochs: int, lr: float, weight_decay: float = 5e-4,
        optimizer: str = "sgd", criterion: InplaceDistillationLoss | None = None, log=print) -> dict[str, float]:
    """Warm-up then cosine decay (one cycle); logs each epoch, returns the final accuracies."""
    criterion = criterion or InplaceDistillationLoss(teacher=model.active.widest)
    optimizer = make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(train), pct_start=0.15)
    accuracy = {}
    for epoch in range(epochs):
        model.train()
        start, seen, total_loss = time.perf_counter(), 0, 0.0
        for images, labels in train:
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(labels)
            total_loss += loss.item() * len(labels)
        accuracy = evaluate(model, val)
        rate = seen / (time.perf_counter() - start)
        scores = "  ".join(f"{name}: {acc:.3f}" for name, acc in accuracy.items())
        log(f"epoch {epoch + 1}/{epochs}  loss {total_loss / seen:.3f}  {rate:.0f} img/s  val acc  {scores}")
    return accuracy
