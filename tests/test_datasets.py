"""The dataset registry: bundled data, users' folders and CIFAR batches made here in tmp_path."""

import pickle

import numpy as np
import pytest
import torch

from paradis_fast.train import datasets
from paradis_fast.train.datasets import DatasetError, load


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("name,size,shape", [("digits", 1797, (1, 8, 8)), ("mnist5k", 5000, (1, 28, 28))])
def test_bundled_classification_splits_are_deterministic_and_disjoint(name, size, shape):
    a, b, other = load(name, seed=3), load(name, seed=3), load(name, seed=4)
    assert _same(a.train, b.train) and _same(a.val, b.val)
    assert not torch.equal(a.val.tensors[1], other.val.tensors[1])
    assert len(a.train) + len(a.val) == size and a.train.tensors[0].shape[1:] == shape
    assert a.num_classes == 10 and set(a.train.tensors[1].tolist()) == set(range(10))
    # standardised with the training set's statistics
    assert abs(a.train.tensors[0].mean().item()) < 1e-4 and abs(a.train.tensors[0].std().item() - 1) < 1e-3
    # no validation image is also a training image
    train = {row.numpy().tobytes() for row in a.train.tensors[0]}
    assert (
        sum(row.numpy().tobytes() in train for row in a.val.tensors[0]) < len(a.val) // 50
    )  # MNIST has a few duplicates


def test_photos_are_lr_hr_pairs_from_held_out_photos():
    split = load("photos", seed=1, patch=24, train_patches=16, val_patches=4)
    assert split.task == "super_resolution" and split.scale == 2
    lr, hr = split.train.tensors
    assert hr.shape == (16, 3, 24, 24) and lr.shape == (16, 3, 12, 12)
    assert 0 <= lr.min() and hr.max() <= 1 and hr.std() > 0.05
    torch.testing.assert_close(lr, datasets.downscale(hr, 2))
    # a constant image downscales to itself; bicubic upscaling of a smooth ramp is close to it
    flat = torch.full((3, 8, 8), 0.3)
    torch.testing.assert_close(datasets.downscale(flat, 2), torch.full((3, 4, 4), 0.3))
    assert _same(split.val, load("photos", seed=1, patch=24, train_patches=16, val_patches=4).val)
    with pytest.raises(DatasetError, match="not a multiple of the scale"):
        load("photos", patch=25)


def _write_image(path, color):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), color, dtype=np.uint8)).save(path)


def test_imagefolder_reads_class_folders(tmp_path):
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            _write_image(tmp_path / name / f"{i}.png", 40 * label + 10 * i)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    split = load(f"imagefolder:{tmp_path}", seed=0, image_size=8)
    assert split.num_classes == 2 and split.in_channels == 3
    assert len(split.train) == 8 and len(split.val) == 2
    image, label = split.val[0]
    assert image.shape == (3, 8, 8) and label in (0, 1)
    labels = sorted(split.val[i][1] for i in range(len(split.val)))
    assert labels == [0, 1]  # every class is validated
    # pixel values come from the file: the constant colour, scaled to [-1, 1]
    value = image[0, 0, 0].item()
    assert any(abs(value - (40 * label + 10 * i) / 127.5 + 1) < 1e-6 for i in range(5))
    again = load(f"imagefolder:{tmp_path}", seed=0, image_size=8)
    assert again.val.samples == split.val.samples


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="is not a directory"):
        load(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(DatasetError, match="needs a path"):
        load("imagefolder:")
    with pytest.raises(DatasetError, match="no class folders"):
        load(f"imagefolder:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no images"):
        load(f"imagefolder:{tmp_path}")
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    split = load(f"imagefolder:{tmp_path}")
    with pytest.raises(DatasetError, match="cannot read image"):
        split.train[0]


def _write_cifar(root, count=4, seed=0):
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, count).tolist(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reads_pickle_batches(tmp_path):
    _write_cifar(tmp_path)
    split = load(f"cifar10:{tmp_path}")
    assert len(split.train) == 20 and len(split.val) == 4 and split.num_classes == 10
    with open(tmp_path / "test_batch", "rb") as f:
        raw = pickle.load(f)
    image, label = split.val[1]
    assert image.shape == (3, 32, 32) and label.item() == raw[b"labels"][1]
    # the layout is CIFAR's: 1024 red, then green, then blue values, row-major
    red = torch.tensor(raw[b"data"][1][:1024], dtype=torch.float32).reshape(32, 32)
    assert torch.corrcoef(torch.stack([red.flatten(), image[0].flatten()]))[0, 1] > 0.999


def test_cifar10_errors(tmp_path):
    with pytest.raises(DatasetError, match="is not a directory"):
        load(f"cifar10:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match="missing file .*data_batch_1"):
        load(f"cifar10:{tmp_path}")
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_3 is not a CIFAR-10 python batch"):
        load(f"cifar10:{tmp_path}")
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, f)
    with pytest.raises(DatasetError, match="2 images but 1 labels"):
        load(f"cifar10:{tmp_path}")


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*cifar10:PATH"):
        load("nope")
    with pytest.raises(DatasetError, match="unknown dataset 'digits:x'"):
        load("digits:x")
