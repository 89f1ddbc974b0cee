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
    assert len(tables["super_resolution"]) == 4 and tables["super_resolution"][0]["bicubic"]["mean"] > 10
    saved = json.loads((tmp_path / "reproduce.json").read_text())
    assert len(saved["runs"]) == 2 * 3 + 2 and saved["tables"]["claim3"][0]["switch"] == "2x0.5"
    text = (tmp_path / "reproduce.md").read_text()
    assert "Claim 1" in text and "Claim 3" in text and "| 0.5+0.25+0.25 |" in text
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
