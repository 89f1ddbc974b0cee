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
    # pixel values come from the file: the constant colour, normalised with ImageNet's red mean and std
    value = image[0, 0, 0].item()
    assert any(abs(value - ((40 * label + 10 * i) / 255 - 0.485) / 0.229) < 1e-5 for i in range(5))
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
    with pytest.raises(DatasetError, match="none of the 1 training images under .* can be read: .*broken.png"):
        split.train[0]
    with pytest.raises(
        DatasetError, match="takes no image_size \\(--image-size\\); imagefolder:PATH, srfolder:PATH do"
    ):
        load("digits", image_size=32)


# (mode, extension) of the images `write_class_folders` writes: every conversion to RGB is exercised
FORMATS = [("RGB", "png"), ("L", "jpg"), ("RGBA", "png"), ("P", "png"), ("RGB", "jpg"), ("L", "png")]


def write_image(path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def write_class_folders(root, classes=("ant", "bee", "cat"), per_class: int = 5, corrupt: int = 0) -> None:
    """``root/<class>/<i>.png|jpg``: 8-40 pixel images of every format, and ``corrupt`` files of
    random bytes named ``.png`` in the first class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, extension = FORMATS[(c + i) % len(FORMATS)]
            write_image(
                root / name / f"{i}.{extension}", 8 + (9 * i + c) % 33, 8 + (5 * i + 3 * c) % 33, mode, i + 10 * c
            )
    for i in range(corrupt):
        (root / classes[0] / f"corrupt{i}.png").write_bytes(np.random.default_rng(i).bytes(300))


LOW, HIGH = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # the extremes of ImageNet-normalised pixels


def test_imagenet_layout_uses_its_train_and_val_folders(tmp_path):
    write_class_folders(tmp_path / "train", per_class=4)
    write_class_folders(tmp_path / "val", classes=("bee", "cat"), per_class=2)
    split = load(f"imagefolder:{tmp_path}", image_size=16)
    assert split.num_classes == 3 and len(split.train) == 12 and len(split.val) == 4
    assert sorted(label for _, label in split.val.samples) == [1, 1, 2, 2]  # train's class indices
    assert all(
        path.startswith(str(tmp_path / "val" / ("ant", "bee", "cat")[label])) for path, label in split.val.samples
    )
    assert sorted(label for _, label in split.train.samples) == [0] * 4 + [1] * 4 + [2] * 4
    (tmp_path / "val" / "dog").mkdir()
    write_image(tmp_path / "val" / "dog" / "0.png", 9, 9)
    with pytest.raises(DatasetError, match=f"class dog of {tmp_path}/val is not in {tmp_path}/train"):
        load(f"imagefolder:{tmp_path}")
    (tmp_path / "val").rename(tmp_path / "test")
    with pytest.raises(DatasetError, match=f"has train/ or val/ but no {tmp_path}/val"):
        load(f"imagefolder:{tmp_path}")


def test_flat_layout_splits_every_class(tmp_path):
    write_class_folders(tmp_path, per_class=6)
    split = load(f"imagefolder:{tmp_path}", image_size=16, seed=2)
    assert split.num_classes == 3 and len(split.train) == 15 and len(split.val) == 3
    assert sorted(label for _, label in split.val.samples) == [0, 1, 2]
    assert {p for p, _ in split.train.samples}.isdisjoint(p for p, _ in split.val.samples)
    assert load(f"imagefolder:{tmp_path}", image_size=16, seed=2).train.samples == split.train.samples


@pytest.mark.parametrize("size", [15, 32])
def test_images_become_normalised_square_tensors_of_any_format(tmp_path, size):
    write_class_folders(tmp_path, per_class=6)  # grey, palette and RGBA PNGs and JPEGs, 8-40 pixels
    split = load(f"imagefolder:{tmp_path}", image_size=size)
    for dataset in (split.train, split.val):
        for i in range(len(dataset)):
            image, _ = dataset[i]
            assert image.shape == (3, size, size) and image.dtype == torch.float32
            assert LOW - 1e-5 <= image.min() and image.max() <= HIGH + 1e-5
    assert all(torch.equal(split.val[i][0], split.val[i][0]) for i in range(len(split.val)))  # no randomness
    torch.manual_seed(0)
    first = torch.stack([split.train[i][0] for i in range(len(split.train))])
    torch.manual_seed(0)
    again = torch.stack([split.train[i][0] for i in range(len(split.train))])
    other = torch.stack([split.train[i][0] for i in range(len(split.train))])
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_transforms_follow_the_imagenet_recipe():
    from PIL import Image

    from paradis_fast.train import image_folders

    # a horizontal ramp: a centre crop keeps the middle columns, in order
    ramp = Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (30, 1))).convert("RGB")  # 50 x 30
    val = image_folders.val_transform(ramp, 21)  # shorter side 30 -> round(21 / 0.875) = 24: 40 x 24, centre 21
    red = val[0] * 0.229 + 0.485
    assert val.shape == (3, 21, 21) and torch.all(red[:, 1:] > red[:, :-1]) and abs(red.mean().item() - 0.49) < 0.02
    draws = [image_folders.train_transform(ramp, 9, torch.Generator().manual_seed(s)) for s in range(20)]
    assert torch.equal(draws[0], image_folders.train_transform(ramp, 9, torch.Generator().manual_seed(0)))
    assert all(d.shape == (3, 9, 9) and LOW - 1e-5 <= d.min() and d.max() <= HIGH + 1e-5 for d in draws)
    flipped = sum(bool(torch.all(d[0, :, 1:] < d[0, :, :-1])) for d in draws)
    assert 3 <= flipped <= 17  # about half the crops are mirrored
    for seed in range(50):
        left, top, right, bottom = image_folders.random_resized_box(50, 30, torch.Generator().manual_seed(seed))
        area, ratio = (right - left) * (bottom - top), (right - left) / (bottom - top)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        assert 0.07 * 1500 <= area and 0.7 <= ratio <= 1.4


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    write_class_folders(tmp_path / "some", classes=("ant",), per_class=4, corrupt=2)
    split = load(f"imagefolder:{tmp_path / 'some'}", image_size=8)
    assert len(split.train) + len(split.val) == 6 and split.train.unreadable == 0
    samples = [dataset[i] for dataset in (split.train, split.val) for i in range(len(dataset))]
    assert split.train.unreadable + split.val.unreadable == 2
    assert all(image.shape == (3, 8, 8) for image, _ in samples)  # the next readable image stands in
    bad = tmp_path / "bad" / "ant"
    bad.mkdir(parents=True)
    (bad / "a.png").write_bytes(b"\x89PNG garbage")
    (bad / "b.jpg").write_bytes(b"")
    split = load(f"imagefolder:{tmp_path / 'bad'}")
    with pytest.raises(DatasetError, match=f"none of the 1 training images under {tmp_path}/bad can be read: {bad}/"):
        split.train[0]


class Interrupted(Exception):
    pass


def test_a_resumed_image_folder_run_draws_the_uninterrupted_crops(tmp_path):
    """Random crops draw from the global generator, which the checkpoint restores: nothing else may draw from it."""
    from paradis_fast.train import TrainConfig, run

    write_class_folders(tmp_path / "data", per_class=6)
    config = dict(
        model="resnet20", width_mult=0.25, switches=["1x1.0", "2x0.5"], dataset=f"imagefolder:{tmp_path / 'data'}"
    )
    config.update(image_size=16, batch_size=5, epochs=2, precision="fp32", quiet=True)
    run(TrainConfig(**config, out=str(tmp_path / "straight")), log=lambda line: None)

    def crash_after_first_epoch(line):
        if line.startswith("epoch 1/2"):
            raise Interrupted

    with pytest.raises(Interrupted):
        run(TrainConfig(**config, out=str(tmp_path / "resumed")), log=crash_after_first_epoch)
    run(TrainConfig(**config, out=str(tmp_path / "resumed"), resume=True), log=lambda line: None)
    a, b = (
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["state_dict"] for run in ("straight", "resumed")
    )
    assert all(torch.equal(a[key], b[key]) for key in a)


def write_position_image(path, width: int, height: int, step: int = 1) -> None:
    """Pixels that encode their position (every ``step``-th of a finer grid): crops can be checked for alignment."""
    from PIL import Image

    ys, xs = np.mgrid[0 : height * step : step, 0 : width * step : step]
    Image.fromarray(np.stack([xs * 5 % 256, ys * 7 % 256, (xs + 3 * ys) % 256], -1).astype(np.uint8)).save(path)


def test_srfolder_pairs_hr_and_lr_files_by_name(tmp_path):
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    for i, (width, height) in enumerate([(24, 20), (25, 21), (30, 16), (20, 40)]):
        write_position_image(tmp_path / "hr" / f"{i}.png", width, height)
        lr_name = f"{i}x2.png" if i % 2 else f"{i}.png"  # DIV2K's name, or the HR image's
        write_position_image(tmp_path / "lr" / lr_name, width // 2, height // 2, step=2)
    split = load(f"srfolder:{tmp_path}", image_size=8, seed=1)
    assert split.task == "super_resolution" and split.scale == 2 and len(split.train) == 3 and len(split.val) == 1
    for _ in range(3):
        for lr, hr in split.train:
            assert lr.shape == (3, 4, 4) and hr.shape == (3, 8, 8)
            assert torch.equal(lr, hr[:, ::2, ::2])  # the LR patch is the HR patch's, pixel for pixel
    lr, hr = split.val[0]
    from PIL import Image

    with Image.open(split.val.samples[0][0]) as image:
        width, height = image.size
    assert hr.shape == (3, height // 2 * 2, width // 2 * 2) and lr.shape == (3, height // 2, width // 2)
    assert torch.equal(lr, hr[:, ::2, ::2]) and 0 <= hr.min() and hr.max() <= 1


def test_srfolder_downscales_a_flat_folder(tmp_path):
    for i, (width, height) in enumerate([(13, 30), (27, 27), (40, 18), (12, 12), (33, 25)]):
        mode, extension = FORMATS[i]
        write_image(tmp_path / f"{i}.{extension}", width, height, mode, seed=i)
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    split = load(f"srfolder:{tmp_path}", scale=3, image_size=12, seed=0)
    assert split.scale == 3 and len(split.train) + len(split.val) == 6 and len(split.val) == 1
    pairs = [split.train[i] for i in range(len(split.train))] + [split.val[0]]
    for lr, hr in pairs[:-1]:
        assert lr.shape == (3, 4, 4) and hr.shape == (3, 12, 12)
        torch.testing.assert_close(lr, datasets.downscale(hr, 3))
    for lr, hr in pairs:
        assert lr.shape[1:] == (hr.shape[1] // 3, hr.shape[2] // 3) and hr.shape[1] % 3 == hr.shape[2] % 3 == 0
        assert 0 <= lr.min() and lr.max() <= 1 and 0 <= hr.min() and hr.max() <= 1
    assert split.train.unreadable + split.val.unreadable == 1
    assert load(f"srfolder:{tmp_path}", scale=3, image_size=12, seed=0).val.samples == split.val.samples


def test_srfolder_errors(tmp_path):
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    for name in ("a", "b"):
        write_image(tmp_path / "hr" / f"{name}.png", 24, 20)
    for name in ("a", "c"):
        write_image(tmp_path / "lr" / f"{name}.png", 12, 10)
    with pytest.raises(
        DatasetError, match="do not pair up by name .*: no lr/ image for hr/b.png; no hr/ image for lr/c.png"
    ):
        load(f"srfolder:{tmp_path}")
    (tmp_path / "lr" / "c.png").unlink()
    write_image(tmp_path / "lr" / "b.png", 10, 10)
    with pytest.raises(
        DatasetError, match=f"{tmp_path}/lr/b.png is 10x10, not {tmp_path}/hr/b.png's 24x20 divided by the scale 2"
    ):
        load(f"srfolder:{tmp_path}", image_size=8)
    write_image(tmp_path / "lr" / "b.png", 12, 10)
    with pytest.raises(DatasetError, match="smaller than the 24-pixel training patch"):
        load(f"srfolder:{tmp_path}", image_size=24)
    with pytest.raises(DatasetError, match="patch size 9 is not a multiple of the scale 2"):
        load(f"srfolder:{tmp_path}", image_size=9)
    (tmp_path / "hr" / "b.png").unlink()
    (tmp_path / "lr" / "b.png").unlink()
    with pytest.raises(DatasetError, match="has 1 image, and needs 2 or more"):
        load(f"srfolder:{tmp_path}")


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
