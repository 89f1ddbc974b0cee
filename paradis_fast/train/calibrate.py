"""Re-estimate every switch's BatchNorm statistics from training batches (no gradients, no updates
to the weights): useful after changing the data pipeline, or for switches whose running averages
lag behind their weights (the slimmable networks' "BN calibration")."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..nn import SwitchBatchNorm2d


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, loader: DataLoader, batches: int, device="cpu") -> int:
    """Reset the running statistics and replace them by the exact average over ``batches`` batches
    (train-mode forwards with momentum None, i.e. a cumulative average per switch). Returns the
    number of batches used."""
    if batches < 1:
        raise ValueError(f"calibration needs at least one batch, got {batches}")
    norms = [m for m in model.modules() if isinstance(m, SwitchBatchNorm2d)]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no SwitchBatchNorm2d layers to calibrate")
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    used = 0
    try:
        for inputs, _ in itertools.islice(loader, batches):
            model(inputs.to(device))
            used += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return used
