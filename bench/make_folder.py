"""An ImageNet-layout folder of synthetic but learnable JPEGs, to time the reproduction on image folders.

    python bench/make_folder.py /tmp/subset      # 10 classes x (50 train + 10 val), sides 192-320 px
    python bench/reproduce.py --dataset imagefolder:/tmp/subset --image-size 224 --epochs 1

Class c is drawn from bundled photo c % 8 (scikit-image's and scikit-learn's, as the 'photos'
dataset) under a colour tint of its own: each image a random crop (30-90% of the photo's sides),
flipped with probability 1/2, resized to sides within 25% of --size, its tint jittered, so a
classifier has something to learn and images differ in size like real ones. Seeded: runs repeat.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paradis_fast.train.datasets import _bundled_photos  # noqa: E402


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _image(photo: torch.Tensor, tint: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One [H, W, 3] uint8 image: a crop of ``photo``, flipped or not, resized and tinted."""
    _, height, width = photo.shape
    h, w = round(height * _uniform(0.3, 0.9, generator)), round(width * _uniform(0.3, 0.9, generator))
    top = int(torch.randint(0, height - h + 1, (), generator=generator))
    left = int(torch.randint(0, width - w + 1, (), generator=generator))
    out = [round(size * _uniform(0.75, 1.25, generator)) for _ in range(2)]
    pixels = F.interpolate(
        photo[None, :, top : top + h, left : left + w], size=out, mode="bilinear", antialias=True, align_corners=False
    )[0]
    if torch.rand((), generator=generator) < 0.5:
        pixels = pixels.flip(-1)
    jitter = 1 + 0.05 * (2 * torch.rand(3, 1, 1, generator=generator) - 1)
    pixels = (pixels * tint.view(3, 1, 1) * jitter).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0)


def make_folder(root: str, classes: int = 10, train: int = 50, val: int = 10, size: int = 256, seed: int = 0) -> str:
    """Writes ``root/{train,val}/cNN/NNNN.jpg`` (``train`` and ``val`` images per class); returns ``root``."""
    from PIL import Image

    photos = _bundled_photos()
    generator = torch.Generator().manual_seed(seed)
    tints = 0.6 + 0.8 * torch.rand(classes, 3, generator=generator)  # per-channel gains 0.6-1.4
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"c{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = _image(photos[c % len(photos)], tints[c], size, generator)
                Image.fromarray(pixels.numpy()).save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to write (created; existing files of the same names are replaced)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=50, help="training images per class (default 50)")
    parser.add_argument("--val", type=int, default=10, help="validation images per class (default 10)")
    parser.add_argument("--size", type=int, default=256, help="typical image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make_folder(args.root, args.classes, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.classes * (args.train + args.val)} images to {args.root}")


if __name__ == "__main__":
    main()
