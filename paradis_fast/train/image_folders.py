"""Users' image folders: class folders for classifiers, photos (HR, or HR/LR pairs) for super-resolution.

Files are decoded with PIL when a sample is asked for, in DataLoader workers with ``--workers``.
A file PIL cannot decode does not stop training: the dataset serves the next readable sample in its
place and flags the file in shared memory, so `FileDataset.unreadable` counts what workers found too.
Random augmentation draws from torch's global generator: in the training process that is the run's
(seeded by ``--seed``, saved in checkpoints), in a worker the one DataLoader seeds from the loader's
generator; so a run repeats for a given seed and worker count (workers change the draws).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..errors import require
from .datasets import DatasetError, Split, _existing_dir, _permutation, downscale

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet's, as pretrained recipes normalise
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CROP_FRACTION = 0.875  # validation: shorter side resized to size / 0.875, then the centre size x size
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # training: random-resized crop's area and aspect


def _rgb(path: str):
    """The file as a decoded RGB PIL image (grey, palette and alpha images converted, alpha dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")  # decodes every pixel, so a truncated file fails here, not later


def _unreadable_errors() -> tuple[type[Exception], ...]:
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises for bad files


def _header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding; None when PIL cannot read it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except _unreadable_errors():
        return None  # skipped when read, like any unreadable file


def to_tensor(image) -> torch.Tensor:
    """An RGB PIL image as a [3, H, W] float tensor in [0, 1]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.reshape(image.height, image.width, 3).permute(2, 0, 1).float() / 255


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform in [0, high]."""
    return int(torch.randint(0, high + 1, (), generator=generator))


def random_resized_box(width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering 8-100% of the area with aspect ratio
    3/4-4/3 (log-uniform); after 10 misses the centre crop nearest those bounds (Szegedy et al. 2015)."""
    area = width * height
    for _ in range(10):
        target = area * _uniform(*CROP_SCALE, generator)
        ratio = math.exp(_uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = _randint(width - w, generator), _randint(height - h, generator)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < CROP_RATIO[0]:
        h = round(width / CROP_RATIO[0])
    elif width / height > CROP_RATIO[1]:
        w = round(height * CROP_RATIO[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - MEAN) / STD


def train_transform(image, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random-resized crop to ``size`` x ``size`` (bilinear), horizontal flip with probability 1/2, normalised."""
    from PIL import Image

    box = random_resized_box(image.width, image.height, generator)
    pixels = to_tensor(image.resize((size, size), Image.BILINEAR, box=box))
    if torch.rand((), generator=generator) < 0.5:
        pixels = pixels.flip(-1)
    return normalise(pixels)


def val_transform(image, size: int) -> torch.Tensor:
    """Shorter side resized to round(size / 0.875), then the centre ``size`` x ``size``, normalised."""
    from PIL import Image

    short = round(size / CROP_FRACTION)
    shorter = min(image.width, image.height)
    width, height = short * image.width // shorter, short * image.height // shorter
    left, top = round((width - size) / 2), round((height - size) / 2)
    image = image.resize((width, height), Image.BILINEAR).crop((left, top, left + size, top + size))
    return normalise(to_tensor(image))


class FileDataset(Dataset):
    """Samples read from files on access; an unreadable file is replaced by the next readable sample.

    Subclasses say how a sample's files are decoded (`_decode`, whose PIL errors mean "unreadable")
    and how decoded images become tensors (`_tensors`, whose errors are bugs and propagate).
    """

    def __init__(self, samples: list[tuple], root: str, name: str, train: bool):
        require("PIL.Image", "reading image files", "pillow")  # fail before training, not at the first batch
        self.samples, self.root, self.name, self.train = samples, root, name, train
        self.flags = torch.zeros(len(samples), dtype=torch.bool).share_memory_()  # seen by every worker

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def unreadable(self) -> int:
        """Files found unreadable so far, by this process or any DataLoader worker."""
        return int(self.flags.sum())

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} of {len(self)} samples")  # ends a `for` loop over the dataset
        errors, first = _unreadable_errors(), ""
        for i in (j % len(self) for j in range(index, index + len(self))):
            if self.flags[i]:
                continue
            try:
                images = self._decode(self.samples[i])
            except errors as error:
                self.flags[i] = True
                first = first or f": {self.samples[i][0]}: {error}"
                continue
            return self._tensors(images, self.samples[i])
        part = "training" if self.train else "validation"
        raise DatasetError(
            f"dataset '{self.name}': none of the {len(self)} {part} images under {self.root} can be read{first}"
        )

    def _decode(self, sample: tuple):
        raise NotImplementedError

    def _tensors(self, images, sample: tuple):
        raise NotImplementedError


class ImageFiles(FileDataset):
    """(path, label) samples as [3, size, size] images normalised with ImageNet's mean and std:
    `train_transform` for training (``train=True``), `val_transform` for validation."""

    def __init__(self, samples: list[tuple[str, int]], size: int, train: bool, root: str):
        super().__init__(samples, root, "imagefolder", train)
        self.size = size

    def _decode(self, sample: tuple[str, int]):
        return _rgb(sample[0])

    def _tensors(self, image, sample: tuple[str, int]) -> tuple[torch.Tensor, int]:
        pixels = train_transform(image, self.size) if self.train else val_transform(image, self.size)
        return pixels, sample[1]


def _image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _class_folders(root: str, expected: str) -> list[str]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DatasetError(f"dataset 'imagefolder': {root} has no class folders (expected {expected})")
    return classes


def _class_images(folder: str) -> list[str]:
    files = _image_files(folder)
    if not files:
        raise DatasetError(
            f"dataset 'imagefolder': class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return [os.path.join(folder, f) for f in files]


def _held_out(count: int, val_fraction: float) -> int:
    """Validation share of ``count`` images: at least one, and at least one left to train on."""
    return min(count - 1, max(1, round(count * val_fraction))) if count > 1 else 0


def imagefolder(path: str, image_size: int = 224, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Class folders in ImageNet's layout, ``PATH/train/<class>/<image>`` and ``PATH/val/<class>/<image>``
    (those splits; the classes are train's), or flat, ``PATH/<class>/<image>``, with a deterministic
    per-class validation split (``val_fraction``, at least one image of each class that has two).
    Classes in sorted order; images ``image_size`` pixels square (see `ImageFiles`)."""
    root = _existing_dir(path, "imagefolder")
    if image_size < 1:
        raise DatasetError(f"dataset 'imagefolder': image size {image_size} is not positive")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(train_dir) or os.path.isdir(val_dir):
        for folder in (train_dir, val_dir):
            if not os.path.isdir(folder):
                raise DatasetError(
                    f"dataset 'imagefolder': {root} has train/ or val/ but no {folder} "
                    "(expected PATH/train/<class>/<image> and PATH/val/<class>/<image>)"
                )
        classes = _class_folders(train_dir, "PATH/train/<class>/<image>")
        val_classes = _class_folders(val_dir, "PATH/val/<class>/<image>")
        unknown = [name for name in val_classes if name not in classes]
        if unknown:
            raise DatasetError(f"dataset 'imagefolder': class {', '.join(unknown)} of {val_dir} is not in {train_dir}")
        train = [(f, label) for label, name in enumerate(classes) for f in _class_images(os.path.join(train_dir, name))]
        val = [(f, classes.index(name)) for name in val_classes for f in _class_images(os.path.join(val_dir, name))]
    else:
        classes = _class_folders(root, "PATH/<class>/<image>, or PATH/train/<class>/<image> and PATH/val/...")
        train, val = [], []
        for label, name in enumerate(classes):
            files = _class_images(os.path.join(root, name))
            samples = [(files[i], label) for i in _permutation(len(files), seed).tolist()]
            n_val = _held_out(len(files), val_fraction)
            val += samples[:n_val]
            train += samples[n_val:]
    return Split(ImageFiles(train, image_size, True, root), ImageFiles(val, image_size, False, root), len(classes), 3)


# ----------------------------------------------------------------------------------------------
# super-resolution
class SuperResolutionFiles(FileDataset):
    """(HR path, LR path or None) samples as (LR, HR) pairs in [0, 1], LR ``scale`` times smaller;
    a missing LR file is made by bicubic downscaling (`downscale`). With ``patch``: random aligned
    crops, ``patch`` HR pixels square; without: whole images cropped to a multiple of ``scale``,
    which differ in size and so are evaluated one at a time (``eval_batch_size``)."""

    def __init__(self, samples: list[tuple[str, str | None]], scale: int, patch: int | None, root: str):
        super().__init__(samples, root, "srfolder", patch is not None)
        self.scale, self.patch = scale, patch
        self.eval_batch_size = 256 if patch else 1

    def _decode(self, sample: tuple[str, str | None]):
        hr, lr = sample
        return _rgb(hr), None if lr is None else _rgb(lr)

    def _tensors(self, images, sample) -> tuple[torch.Tensor, torch.Tensor]:
        hr, lr = images
        s = self.scale
        lr_width, lr_height = (hr.width // s, hr.height // s) if lr is None else lr.size
        left, top, width, height = 0, 0, lr_width, lr_height
        if self.patch:
            width = height = self.patch // s
            left, top = _randint(lr_width - width, None), _randint(lr_height - height, None)
        hr_pixels = to_tensor(hr.crop((left * s, top * s, (left + width) * s, (top + height) * s)))
        if lr is None:
            return downscale(hr_pixels, s), hr_pixels
        return to_tensor(lr.crop((left, top, left + width, top + height))), hr_pixels


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _by_stem(folder: str, rename: Callable[[str], str] = str) -> dict[str, str]:
    """The folder's images by ``rename``d name without extension."""
    images = {}
    for f in _image_files(folder):
        stem = rename(os.path.splitext(f)[0])
        if stem in images:
            raise DatasetError(f"dataset 'srfolder': {images[stem]} and {f} in {folder} pair with the same image")
        images[stem] = f
    return images


def _pairs(hr_dir: str, lr_dir: str, scale: int) -> list[tuple[str, str]]:
    """hr/NAME.* with lr/NAME.* or lr/NAMEx{scale}.*."""
    hr = _by_stem(hr_dir)
    lr = _by_stem(lr_dir, lambda stem: stem if stem in hr else stem.removesuffix(f"x{scale}"))
    no_lr = [hr[stem] for stem in sorted(hr.keys() - lr.keys())]
    no_hr = [lr[stem] for stem in sorted(lr.keys() - hr.keys())]
    if no_lr or no_hr:
        problems = ([f"no lr/ image for hr/{_some(no_lr)}"] if no_lr else []) + (
            [f"no hr/ image for lr/{_some(no_hr)}"] if no_hr else []
        )
        raise DatasetError(
            f"dataset 'srfolder': hr/ and lr/ do not pair up by name (hr/NAME.png with lr/NAME.png or "
            f"lr/NAMEx{scale}.png): {'; '.join(problems)}"
        )
    return [(os.path.join(hr_dir, hr[stem]), os.path.join(lr_dir, lr[stem])) for stem in sorted(hr)]


def _check_sizes(samples: list[tuple[str, str | None]], scale: int, patch: int | None) -> None:
    """LR files HR // scale in size, training images at least a patch: from the headers, before training."""
    for hr, lr in samples:
        hr_size, lr_size = _header_size(hr), _header_size(lr) if lr else None
        if hr_size is None or (lr and lr_size is None):
            continue
        expected = (hr_size[0] // scale, hr_size[1] // scale)
        if lr and lr_size != expected:
            raise DatasetError(
                f"dataset 'srfolder': {lr} is {lr_size[0]}x{lr_size[1]}, not {hr}'s {hr_size[0]}x{hr_size[1]} "
                f"divided by the scale {scale} (is --scale right?)"
            )
        if patch and min(lr_size or expected) < patch // scale:
            raise DatasetError(
                f"dataset 'srfolder': {hr} is {hr_size[0]}x{hr_size[1]}, smaller than the {patch}-pixel "
                "training patch (lower --image-size)"
            )


def srfolder(path: str, scale: int = 2, image_size: int = 96, val_fraction: float = 0.2, seed: int = 0) -> Split:
    """Super-resolution from photos on disk: ``PATH/hr/`` and ``PATH/lr/`` paired by file name, LR
    images HR // ``scale`` in size, or a flat folder of HR images whose LR is their bicubic
    downscaling. A deterministic ``val_fraction`` of the images (at least one) validates; training
    samples are random aligned ``image_size``-pixel HR patches (see `SuperResolutionFiles`)."""
    root = _existing_dir(path, "srfolder")
    if scale < 2:
        raise DatasetError(f"dataset 'srfolder': scale {scale} is not an upscaling factor (2 or more)")
    if image_size < scale or image_size % scale:
        raise DatasetError(f"dataset 'srfolder': patch size {image_size} is not a multiple of the scale {scale}")
    hr_dir, lr_dir = os.path.join(root, "hr"), os.path.join(root, "lr")
    if os.path.isdir(hr_dir) and os.path.isdir(lr_dir):
        samples = _pairs(hr_dir, lr_dir, scale)
    else:
        samples = [(os.path.join(root, f), None) for f in _image_files(root)]
    if len(samples) < 2:
        raise DatasetError(
            f"dataset 'srfolder': {root} has {len(samples)} image{'s' * (len(samples) != 1)}, and needs 2 or "
            f"more: one to validate on (expected PATH/hr/ and PATH/lr/ image pairs, or HR images in PATH: {', '.join(IMAGE_EXTENSIONS)})"
        )
    order = _permutation(len(samples), seed).tolist()
    n_val = _held_out(len(samples), val_fraction)
    train, val = [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]
    _check_sizes(train, scale, image_size)
    _check_sizes(val, scale, None)
    return Split(
        SuperResolutionFiles(train, scale, image_size, root),
        SuperResolutionFiles(val, scale, None, root),
        num_classes=0,
        in_channels=3,
        task="super_resolution",
        scale=scale,
    )
