"""Datasets that ship inside installed packages (no network needed), split deterministically."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import TensorDataset


class Split(NamedTuple):
    train: TensorDataset
    val: TensorDataset
    num_classes: int
    in_channels: int


def _split(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int) -> tuple:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def digits(val_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 1,797 handwritten 8x8 digits, as [N, 1, 8, 8] float images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(data.target, dtype=torch.long)
    train, val = _split(images, labels, val_fraction, seed)
    return Split(train, val, num_classes=10, in_channels=1)


DATASETS = {"digits": digits}


def load(name: str, **kwargs) -> Split:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
