"""export --format parts / PartsDir: each part's file rebuilds exactly split's part, the parts and
the fusion reproduce the model, a process holds only the part it last ran, and a bad directory or
file is named in one line."""

from __future__ import annotations

import copy
import functools
import gc
import json
import shutil
import weakref

import pytest
import torch

from paradis_fast.cli import main
from paradis_fast.deploy import save_checkpoint, split
from paradis_fast.deploy.failover import Coordinator
from paradis_fast.deploy.parts import PartsDir, export_parts
from paradis_fast.deploy.serve import main as serve
from paradis_fast.errors import UserError

import test_deploy_split

KWARGS = {
    "mobilenet_v1": dict(num_classes=7, width_mult=0.25, small_input=True),
    "resnet20": dict(num_classes=7, width_mult=0.5),
    "wdsr_b": dict(scale=3, n_feats=8, block_feats=16, n_blocks=2),
}
SWITCHES = ["1x1.0", "2x0.5", "3x1/3"]


@functools.cache
def trained_model(name: str):
    """`test_deploy_split.trained_model` of `name` on SWITCHES, trained once for every test here
    (float64; tests that need float32 convert a copy)."""
    return test_deploy_split.trained_model(name, SWITCHES)


def tensors(module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@pytest.mark.parametrize("name", list(KWARGS))  # a classifier, residual blocks, a skip branch in the fusion
def test_part_files_rebuild_split_parts_and_reproduce_the_model(tmp_path, name):
    model, shape = trained_model(name)  # float64
    manifest = export_parts(model, ["3x1/3", "2x0.5"], shape, tmp_path, name, KWARGS[name], {"2x0.5": 0.9})
    assert manifest["exported"]["3x1/3"]["parts"][2]["file"] == "3x1_3/part2.pt"
    assert manifest["dtype"] == "float64" and manifest["accuracy"] == {"2x0.5": 0.9}
    parts = PartsDir(tmp_path)
    assert [str(s) for s in parts.switches] == ["3x1/3", "2x0.5"] and parts.input_shape == list(shape)
    image = torch.randn(3, *shape, dtype=torch.float64)
    for switch in ("3x1/3", "2x0.5"):
        reference = split(model, switch)
        partials = []
        for j, expected in enumerate(reference.parts):
            part = parts.part(switch, j)
            assert not part.training and not any(t.requires_grad for t in tensors(part))
            assert [type(m) for m in part.modules()] == [type(m) for m in expected.modules()]
            loaded, cut = part.state_dict(), expected.state_dict()
            assert list(loaded) == list(cut)
            for key in cut:  # the same weights in the same layout (channels_last on CPU)
                assert loaded[key].dtype == cut[key].dtype and loaded[key].stride() == cut[key].stride()
                assert torch.equal(loaded[key], cut[key])
            with torch.no_grad():
                partials.append(part(image))
                torch.testing.assert_close(partials[-1], expected(image), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            fused = parts.fusion(switch).fuse(partials, image)
            expected_output = model.set_active([switch])(image)[0]
        torch.testing.assert_close(fused, expected_output, rtol=1e-10, atol=1e-10)


def test_a_process_holds_only_the_part_it_last_ran(tmp_path):
    model, shape = trained_model("mobilenet_v1")
    export_parts(model, SWITCHES, shape, tmp_path, "mobilenet_v1", KWARGS["mobilenet_v1"])
    loaded = []
    parts = PartsDir(tmp_path, log=loaded.append)
    first = parts.part("3x1/3", 1)
    assert parts.part("3x1/3", 1) is first  # kept while it is the part run
    held = weakref.ref(first)
    del first
    second = parts.part("2x0.5", 1)
    gc.collect()
    assert held() is None  # re-planned onto another part: the one it ran is freed
    bytes_held = sum(t.nbytes for t in tensors(second))
    assert bytes_held == split(model, "2x0.5").stats(shape)[1].param_bytes  # nothing but its own weights
    parts.fusion("2x0.5")
    assert [line.split(" from ")[0] for line in loaded] == [
        "loaded part 1 of switch 3x1/3",
        "loaded part 1 of switch 2x0.5",
        "loaded fusion of switch 2x0.5",
    ]
    assert loaded[1].endswith(f"{tmp_path}/2x0.5/part1.pt ({bytes_held} bytes)")


def test_export_command_writes_the_switches_asked_for(tmp_path, capsys):
    model, shape = trained_model("mobilenet_v1")
    save_checkpoint(
        tmp_path / "c.pt", copy.deepcopy(model).float(), "mobilenet_v1", KWARGS["mobilenet_v1"], input_shape=shape
    )
    request = ["export", "--checkpoint", str(tmp_path / "c.pt"), "--format", "parts", "--out"]
    main([*request, str(tmp_path / "some"), "--switch", "2x0.5,1x1.0"])
    assert "switch 2x0.5, 1x1.0 of mobilenet_v1" in capsys.readouterr().out
    main([*request, str(tmp_path / "all"), "--all-switches"])
    for out, switches in [("some", ["2x0.5", "1x1.0"]), ("all", SWITCHES)]:
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert list(manifest["exported"]) == switches and manifest["dtype"] == "float32"
        files = sorted(str(p.relative_to(tmp_path / out)) for p in (tmp_path / out).rglob("*.pt"))
        expected = [
            f"{s.replace('/', '_')}/{f}"
            for s in switches
            for f in ("fusion.pt", *(f"part{j}.pt" for j in range(int(s[0]))))
        ]
        assert files == sorted(expected)
        header = torch.load(tmp_path / out / "1x1.0" / "part0.pt", weights_only=True)
        assert {k: header[k] for k in ("model", "kwargs", "switches", "switch", "part")} == dict(
            model="mobilenet_v1", kwargs=KWARGS["mobilenet_v1"], switches=SWITCHES, switch="1x1.0", part=0
        )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, shape = trained_model("mobilenet_v1")
    out = tmp_path_factory.mktemp("parts") / "good"
    export_parts(copy.deepcopy(model).float(), ["2x0.5", "1x1.0"], shape, out, "mobilenet_v1", KWARGS["mobilenet_v1"])
    return out


def broken_copy(exported, tmp_path, damage) -> str:
    out = tmp_path / "parts"
    shutil.copytree(exported, out)
    damage(out)
    return str(out)


def serve_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit:
        serve([*argv, "--release-freed-memory"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m paradis_fast.deploy.serve: error: ")
    return err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json; write the directory with export --format parts"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json: cannot be read as JSON"),
        (
            lambda d: (d / "manifest.json").write_text('{"format": "torch-export"}'),
            "not a parts manifest (format 'torch-export')",
        ),
        (lambda d: (d / "2x0.5" / "part1.pt").unlink(), "2x0.5/part1.pt is missing (listed in manifest.json)"),
    ],
)
def test_a_bad_directory_is_named_before_serving(exported, tmp_path, capsys, damage, message):
    path = broken_copy(exported, tmp_path, damage)
    assert message in serve_error(capsys, "--parts", path, "--switch", "2x0.5")


def swap(a, b):
    def damage(d):
        (d / a).rename(d / "tmp")
        (d / b).rename(d / a)
        (d / "tmp").rename(d / b)

    return damage


def graft(header_of, weights_of):
    """A file with `header_of`'s header and `weights_of`'s weights (a right name, wrong contents)."""

    def damage(d):
        saved = torch.load(d / header_of, weights_only=True)
        saved["state_dict"] = torch.load(d / weights_of, weights_only=True)["state_dict"]
        torch.save(saved, d / header_of)

    return damage


def rename_class(d):
    """A part file whose structure names a class outside torch.nn and paradis_fast."""
    saved = torch.load(d / "1x1.0" / "part0.pt", weights_only=True)
    saved["structure"]["children"]["0"]["cls"] = ("subprocess", "Popen")
    torch.save(saved, d / "1x1.0" / "part0.pt")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "1x1.0" / "part0.pt").write_bytes(b"\0" * 64), "not a file written by torch.save"),
        (lambda d: torch.save({"weights": 1}, d / "1x1.0" / "part0.pt"), "not a part file written by export"),
        (swap("1x1.0/part0.pt", "2x0.5/part0.pt"), "does not match manifest.json (switch '2x0.5', manifest '1x1.0')"),
        (graft("1x1.0/part0.pt", "2x0.5/part1.pt"), "cannot be rebuilt (0.0.0.weight has shape"),
        (rename_class, "cannot be rebuilt (class subprocess.Popen is not one of torch.nn or paradis_fast)"),
    ],
)
def test_a_bad_part_file_is_named_when_loaded(exported, tmp_path, capsys, damage, message):
    """The fault-tolerant coordinator alone (world size 1) plans 1x1.0 and loads its file."""
    path = broken_copy(exported, tmp_path, damage)
    err = serve_error(capsys, "--parts", path, "--fault-tolerant", "--world-size", "1", "--store-port", "0")
    assert f"{path}/1x1.0/part0.pt: {message}" in err


def test_switches_and_shapes_not_exported_are_named(exported):
    parts = PartsDir(exported)
    with pytest.raises(UserError, match="holds the parts of switches 2x0.5, 1x1.0, not 3x1/3; export it with"):
        parts.part("3x1/3", 0)
    store = torch.distributed.HashStore()
    with pytest.raises(UserError, match="switch 3x1/3 is not among those served: 2x0.5, 1x1.0"):
        Coordinator(store, parts, [], parts.input_shape, switch="3x1/3", log=lambda _: None)
    with pytest.raises(UserError, match=r"exported for images of shape \[3, 16, 16\], not \[3, 8, 8\]"):
        Coordinator(store, parts, [], [3, 8, 8], log=lambda _: None)
