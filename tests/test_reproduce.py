"""bench/reproduce.py end to end at a reduced size (the --quick run takes minutes, over this suite's budget)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules["reproduce"]


def test_reduced_reproduction_writes_every_claim(reproduce, tmp_path):
    profile = reproduce.Profile(
        seeds=[0, 1],
        dataset="digits",
        data=dict(val_fraction=0.7),
        width_mult=0.25,
        epochs=1,
        batch_size=128,
        sr_seeds=[0],
        sr_width_mult=0.25,
        sr_blocks=1,
        sr_epochs=1,
        sr_data=dict(patch=16, train_patches=16, val_patches=8),
    )
    tables = reproduce.reproduce(profile, str(tmp_path), workers=1, command="test", log=lambda line: None)
    assert [r["switch"] for r in tables["claim1"]] == reproduce.SWITCHES
    # claim 2 pairs each switch with the slimmable width of equal FLOPs, claim 3 with its per-device width
    assert [r["slimmable_switch"] for r in tables["claim2"]] == ["1x1.0", "1x0.71875", "1x0.5", "1x0.625"]
    assert [(r["switch"], r["slimmable_switch"]) for r in tables["claim3"]] == [
        ("2x0.5", "1x0.5"),
        ("4x0.25", "1x0.25"),
        ("0.5+0.25+0.25", "1x0.5"),
    ]
    for row in tables["claim1"]:
        assert row["paradis"]["n"] == 2 and 0 <= row["paradis"]["mean"] <= 100
        assert row["delta"] == pytest.approx(row["paradis"]["mean"] - row["individual"]["mean"])
    # both width baselines, the slimmable network and the US-Net, at those widths, every seed
    assert reproduce.WIDTH_BASELINES == ("slimmable", "universally-slimmable")
    for row in tables["claim2"] + tables["claim3"]:
        assert set(row["delta"]) == set(reproduce.WIDTH_BASELINES)
        for method in reproduce.WIDTH_BASELINES:
            assert row[method]["n"] == 2 and 0 <= row[method]["mean"] <= 100
            assert row["delta"][method] == pytest.approx(row["paradis"]["mean"] - row[method]["mean"])
    assert len(tables["super_resolution"]) == 4 and tables["super_resolution"][0]["bicubic"]["mean"] > 10
    saved = json.loads((tmp_path / "reproduce.json").read_text())
    assert len(saved["runs"]) == 2 * 4 + 2 and saved["tables"]["claim3"][0]["switch"] == "2x0.5"
    us_nets = [r for r in saved["runs"] if r["config"]["baseline"] == "universally-slimmable"]
    assert [(r["config"]["seed"], r["config"]["model"]) for r in us_nets] == [(0, "mobilenet_v1"), (1, "mobilenet_v1")]
    # the US-Net reports the widths it was evaluated at: the claims' widths among them
    assert list(us_nets[0]["result"]["switches"]) == ["1x1.0", "1x0.71875", "1x0.625", "1x0.5", "1x0.25"]
    text = (tmp_path / "reproduce.md").read_text()
    assert "Claim 1" in text and "Claim 3" in text and "| 0.5+0.25+0.25 |" in text
    assert "| switch | FLOPs (x full) | width | ParaDiS | slimmable | US-Net | Δ slimmable | Δ US-Net |" in text
    row = tables["claim2"][1]
    assert (
        f"| 2x0.5 | 0.500 | 1x0.71875 | {reproduce._cell(row['paradis'])} | {reproduce._cell(row['slimmable'])} | "
        f"{reproduce._cell(row['universally-slimmable'])} | {row['delta']['slimmable']:+.2f} | "
        f"{row['delta']['universally-slimmable']:+.2f} |" in text
    )
    assert "| 4x0.25 | 4 | 0.0625 | 1x0.25 |" in text and "US-Net calibrates" in text
    assert "MobileNet v1 (small_input, width 0.25) on digits, 1 epochs" in text  # as before --dataset existed
    assert (tmp_path / "reproduce.png").read_bytes()[:4] == b"\x89PNG"


def test_only_super_resolution(reproduce, tmp_path):
    profile = reproduce.Profile(
        sr_seeds=[0],
        sr_width_mult=0.25,
        sr_blocks=1,
        sr_epochs=1,
        sr_data=dict(patch=16, train_patches=16, val_patches=8),
    )
    tables = reproduce.reproduce(
        profile, str(tmp_path), workers=1, command="test", log=lambda line: None, tasks=("super-resolution",)
    )
    assert tables["claim1"] == tables["claim2"] == tables["claim3"] == []
    assert [r["switch"] for r in tables["super_resolution"]] == reproduce.SWITCHES
    text = (tmp_path / "reproduce.md").read_text()
    assert "Claim 1" not in text and "Super-resolution" in text
    assert (tmp_path / "reproduce.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def make_folder():
    spec = importlib.util.spec_from_file_location("make_folder", ROOT / "bench" / "make_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_folder


def test_defaults_are_unchanged(reproduce):
    assert reproduce.settings([])[1:] == (reproduce.PROFILES["full"], reproduce.TASKS)
    assert reproduce.settings(["--quick"])[1:] == (reproduce.PROFILES["quick"], reproduce.TASKS)
    # the smoke run keeps the fixed convolution rules: measuring each new layer shape's path would be
    # most of a 1-epoch US-Net run (its random widths make new shapes most steps); the full run measures


def test_folder_options_reach_every_job(reproduce):
    from paradis_fast.train import TrainConfig

    argv = ["--dataset", "imagefolder:/data/in", "--image-size", "64", "--data-workers", "3", "--model", "resnet20"]
    argv += ["--epochs", "2", "--batch-size", "16", "--seeds", "2"]
    _, profile, tasks = reproduce.settings(argv)
    assert tasks == ("classification",)  # no --sr-dataset: the photos say nothing about the folder
    configs = [TrainConfig(**job) for job in reproduce._jobs(profile, tasks)]
    assert len(configs) == 2 * 4
    assert [c.baseline for c in configs[:4]] == [None, "individual", "slimmable", "universally-slimmable"]
    assert {(c.model, c.dataset, c.image_size, c.workers, c.epochs, c.batch_size) for c in configs} == {
        ("resnet20", "imagefolder:/data/in", 64, 3, 2, 16)
    }

    _, profile, tasks = reproduce.settings(argv + ["--sr-dataset", "srfolder:/data/sr", "--sr-image-size", "48"])
    assert tasks == reproduce.TASKS
    configs = [TrainConfig(**job) for job in reproduce._jobs(profile, tasks)]
    sr = [c for c in configs if c.model == "wdsr_a"]
    assert len(sr) == 2 * 2 and len(configs) == 2 * 4 + 2 * 2
    assert [(c.dataset, c.image_size, c.workers, c.dataset_kwargs) for c in sr] == [
        ("srfolder:/data/sr", 48, 3, {})
    ] * 4
    assert {c.image_size for c in configs if c.model == "resnet20"} == {64}


def test_reproduction_on_generated_folders(reproduce, make_folder, tmp_path):
    from PIL import Image

    root = make_folder(str(tmp_path / "data"), classes=2, train=20, val=2, size=28)
    sizes = [Image.open(f).size for f in (tmp_path / "data").glob("*/*/*.jpg")]
    assert len(sizes) == 2 * 22 and 16 <= min(min(s) for s in sizes) and max(max(s) for s in sizes) <= 40
    out = tmp_path / "out"
    reproduce.main(
        ["--quick", "--seeds", "1", "--workers", "1", "--out", str(out), "--dataset", f"imagefolder:{root}"]
        + ["--image-size", "32", "--batch-size", "8", "--sr-dataset", f"srfolder:{root}/train/c00"]
        + ["--sr-image-size", "16"]
    )
    saved = json.loads((out / "reproduce.json").read_text())
    tables = saved["tables"]
    assert [r["switch"] for r in tables["claim1"]] == reproduce.SWITCHES
    assert [r["switch"] for r in tables["claim3"]] == ["2x0.5", "4x0.25", "0.5+0.25+0.25"]
    assert [r["switch"] for r in tables["super_resolution"]] == reproduce.SWITCHES
    for row in tables["claim2"]:
        assert 0 <= row["paradis"]["mean"] <= 100 and row["paradis"]["n"] == 1  # 1 seed, 1 validation score each
    assert set(tables["seconds"]) == set(reproduce.TASKS) and tables["seconds"]["classification"]["paradis"]["mean"] > 0
    assert {(r["config"]["dataset"], r["config"]["image_size"]) for r in saved["runs"]} == {
        (f"imagefolder:{root}", 32),
        (f"srfolder:{root}/train/c00", 16),
    }
    text = (out / "reproduce.md").read_text()
    assert f"on imagefolder:{root} at 32 px" in text and f"on srfolder:{root}/train/c00" in text
    assert "Claim 3" in text and "Seconds per run" in text
    assert (out / "reproduce.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "layout, message",
    [
        (None, "is not a directory"),
        ({"cat/notes.txt": b"no image"}, "class folder"),
    ],
)
def test_bad_folder_fails_in_one_line_before_any_run(reproduce, tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    for name, content in (layout or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    with pytest.raises(SystemExit) as exit:
        reproduce.main(["--dataset", f"imagefolder:{root}", "--workers", "1", "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("reproduce.py: error: dataset 'imagefolder'") and message in printed.err
    assert "training runs" not in printed.out and not (tmp_path / "out").exists()
