"""export: one file per part + the fusion + a manifest; the exported files reproduce the model."""

from __future__ import annotations

import json

import pytest
import torch

from paradis_fast import models
from paradis_fast.cli import main
from paradis_fast.deploy import save_checkpoint

from test_deploy_split import trained_model

SHAPES = {"mobilenet_v1": (3, 16, 16), "wdsr_b": (3, 5, 6)}


def write_checkpoint(tmp_path, name: str, switches):
    """A float32 checkpoint of a trained tiny model (non-trivial BatchNorm rows and statistics)."""
    model, shape = trained_model(name, switches)
    builder_kwargs = {
        "mobilenet_v1": dict(num_classes=7, width_mult=0.25, small_input=True),
        "wdsr_b": dict(scale=3, n_feats=8, block_feats=16, n_blocks=2),
    }[name]
    model = model.float()
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, model, name, builder_kwargs, input_shape=shape)
    return model.eval(), path


def expected_output(model, switch, image):
    with torch.no_grad():
        return model.set_active([switch])(image)[0]


def manifest_of(out):
    with open(out / "manifest.json") as f:
        return json.load(f)


@pytest.mark.parametrize("name, switch", [("mobilenet_v1", "0.3+0.7"), ("wdsr_b", "2x0.5")])
def test_torch_export_files_reproduce_the_model(tmp_path, name, switch):
    model, path = write_checkpoint(tmp_path, name, ["1x1.0", "2x0.5", "0.3+0.7"])
    out = tmp_path / "out"
    main(["export", "--checkpoint", str(path), "--switch", switch, "--format", "torch-export", "--out", str(out)])
    manifest = manifest_of(out)
    assert manifest["switch"] == switch and manifest["model"] == name and len(manifest["parts"]) == 2
    assert manifest["input_shape"] == ["batch", *SHAPES[name]]
    assert manifest["fusion"]["inputs"] == (["total", "image"] if name == "wdsr_b" else ["total"])
    image = torch.randn(5, *SHAPES[name])  # another batch size than at export: the batch is dynamic
    parts = [torch.export.load(out / part["file"]) for part in manifest["parts"]]
    for program in parts:  # stock aten ops only: no paradis custom op survives in a part
        assert not any("paradis" in str(node.target) for node in program.graph.nodes)
    total = sum(program.module()(image) for program in parts)
    fusion = torch.export.load(out / manifest["fusion"]["file"]).module()
    fused = fusion(total, image) if "image" in manifest["fusion"]["inputs"] else fusion(total)
    torch.testing.assert_close(fused, expected_output(model, switch, image), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, switch", [("mobilenet_v1", "2x0.5"), ("wdsr_b", "0.3+0.7")])
def test_onnx_files_run_in_onnxruntime(tmp_path, name, switch):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnx onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX parts needs onnxruntime")
    model, path = write_checkpoint(tmp_path, name, ["1x1.0", "2x0.5", "0.3+0.7"])
    out = tmp_path / "out"
    main(["export", "--checkpoint", str(path), "--switch", switch, "--format", "onnx", "--out", str(out)])
    manifest = manifest_of(out)
    assert sorted(p.name for p in out.iterdir()) == ["fusion.onnx", "manifest.json", "part0.onnx", "part1.onnx"]
    image = torch.randn(3, *SHAPES[name])

    def run(file, *inputs):
        session = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]

    total = sum(torch.from_numpy(run(part["file"], image)) for part in manifest["parts"])
    extra = (image,) if "image" in manifest["fusion"]["inputs"] else ()
    fused = torch.from_numpy(run(manifest["fusion"]["file"], total, *extra))
    torch.testing.assert_close(fused, expected_output(model, switch, image), rtol=1e-5, atol=1e-5)


def test_bad_requests_are_named(tmp_path, capsys):
    model = models.resnet20(10, ["1x1.0"], width_mult=0.5)
    save_checkpoint(tmp_path / "c.pt", model, "resnet20", dict(num_classes=10, width_mult=0.5))
    request = ["export", "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "o")]
    for extra, message in [
        (["--switch", "1x1.0"], "records no input shape; pass --input-shape C,H,W"),
        (["--switch", "2x0.5", "--input-shape", "3,8,8"], "switch 2x0.5 is not in the switch set"),
        (["--switch", "1x1.0", "--format", "tflite"], "invalid choice: 'tflite'"),
        (["--switch", "1x1.0,1x1.0", "--input-shape", "3,8,8"], "--format torch-export writes one switch"),
        (["--switch", "1x1.0,1x1.0", "--format", "parts", "--input-shape", "3,8,8"], "switch 1x1.0 appears twice"),
        (["--input-shape", "3,8,8"], "one of the arguments --switch --all-switches is required"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(request + extra)
        assert exit.value.code == 2
        assert message in capsys.readouterr().err
