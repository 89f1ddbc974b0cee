"""The universally slimmable (US-Net) baseline: width sampling, shared BatchNorm affine, calibration."""

import json
from fractions import Fraction

import pytest
import torch

from paradis_fast import cli
from paradis_fast.errors import UserError
from paradis_fast.models import mobilenet_v1
from paradis_fast.nn import SwitchBatchNorm2d
from paradis_fast.train import TrainConfig
from paradis_fast.train.baselines import WIDTH_GRID, Sandwich, UniversalWidths, share_batch_norm_affine
from paradis_fast.train.calibrate import calibrate_batch_norm
from paradis_fast.train.checkpoint import load_checkpoint
from paradis_fast.train.experiment import build
from paradis_fast.train.trainer import evaluate

PARADIS = ["1x1.0", "2x0.5", "4x0.25"]


def _width(switch) -> Fraction:
    return switch.widths[0]


def _model(switches, seed=0):
    torch.manual_seed(seed)
    return mobilenet_v1(num_classes=10, switches=switches, width_mult=0.25, small_input=True, in_channels=1)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, SwitchBatchNorm2d)]


def test_widths_are_drawn_on_the_grid_with_the_widest_and_narrowest_every_step():
    widths = UniversalWidths(PARADIS)
    assert [str(s) for s in widths.evaluated] == ["1x1.0", "1x0.71875", "1x0.5", "1x0.25"]
    assert len(widths.sampled) == 25 and set(widths.evaluated) <= set(widths.switches)
    sandwich, generator = Sandwich(widths.sampled), torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        chosen = [_width(s) for s in sandwich(generator)]
        assert chosen[0] == 1 and chosen[-1] == Fraction(1, 4) and len(chosen) == 4
        middle = chosen[1:-1]
        assert middle == sorted(middle, reverse=True) and len(set(middle)) == 2
        assert all(Fraction(1, 4) < w < 1 and (w * WIDTH_GRID).denominator == 1 for w in middle)
        seen.update(middle)
    assert len(seen) >= 20  # of the 23 inner grid widths: drawn across the range, not a fixed few


def test_given_range_keeps_its_ends_and_the_evaluated_widths_inside_it():
    widths = UniversalWidths(PARADIS, ["0.75", "1/3"])  # either order; 1/3 is off the grid
    assert _width(widths.sampled[0]) == Fraction(3, 4) and _width(widths.sampled[-1]) == Fraction(1, 3)
    assert _width(widths.sampled[-2]) == Fraction(11, 32)
    assert [str(s) for s in widths.evaluated] == ["1x0.75", "1x0.71875", "1x0.5", "1x1/3"]
    with pytest.raises(UserError, match="two widths"):
        UniversalWidths(PARADIS, ["1.0", "0.5", "0.25"])


def _key(model, module, name):
    return next(n for n, m in model.named_modules() if m is module) + "." + name


def test_a_step_on_one_width_moves_the_affine_parameters_every_width_uses():
    model = _model(["1x1.0", "1x0.5", "1x0.25"])
    assert share_batch_norm_affine(model) == len(_norms(model))
    norm = _norms(model)[-1]
    assert norm.weight.shape == (1, norm.num_features)
    key, covered = _key(model, norm, "weight"), norm.switches[2].covered(norm.num_features)
    before = model.state_dict()[key]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.set_active(["1x0.25"])
    model(torch.randn(8, 1, 8, 8)).square().mean().backward()
    optimizer.step()
    after = model.state_dict()[key]
    assert after.shape == (3, norm.num_features)  # the state dict keeps nn's [S, C] tables
    for s in range(3):  # the step on 1x0.25 moved the gamma that 1x1.0 and 1x0.5 read too
        assert not torch.equal(after[s, :covered], before[s, :covered])
        torch.testing.assert_close(after[s], after[0])
    torch.testing.assert_close(after[:, covered:], before[:, covered:])


def test_shared_state_dicts_load_into_ordinary_models_and_back():
    switches = ["1x1.0", "1x0.5"]
    shared, ordinary = _model(switches, seed=0), _model(switches, seed=1)
    share_batch_norm_affine(shared)
    for norm in _norms(shared):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
    ordinary.load_state_dict(shared.state_dict())
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(ordinary.eval()(images), shared.eval()(images))
    again = _model(switches, seed=2)
    share_batch_norm_affine(again)
    again.load_state_dict(ordinary.state_dict())
    torch.testing.assert_close(again.eval()(images), shared(images))
    _norms(ordinary)[0].weight.data[1] += 1  # private rows that differ cannot be shared
    with pytest.raises(RuntimeError, match="rows differ"):
        again.load_state_dict(ordinary.state_dict())


def _one_switch_state(model, s):
    """``model``'s weights as a state dict of the same network built for its switch ``s`` alone."""
    state = model.state_dict()
    for norm in _norms(model):
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key = _key(model, norm, name)
            state[key] = state[key][s : s + 1]
    return state


def test_calibration_per_evaluated_width_matches_each_width_calibrated_alone():
    widths = UniversalWidths(["1x1.0", "2x0.5"], ["0.5", "1.0"])
    # float64: float32 convolutions may round differently for 3 switches than for 1 (batch-dependent
    # blocking in ATen's CPU convolution), and BatchNorm over 6 one-pixel values magnifies that
    model = _model([str(s) for s in widths.switches]).double()
    share_batch_norm_affine(model)
    for norm in _norms(model):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
    batches = [
        (torch.randn(6, 1, 8, 8, dtype=torch.float64) + 0.3 * i, torch.zeros(6, dtype=torch.long)) for i in range(3)
    ]
    model.train()(batches[0][0])  # training leaves every row some statistics
    stem = _norms(model)[0]
    trained = stem.running_mean.clone()
    model.set_active(widths.evaluated)
    assert calibrate_batch_norm(model, batches, batches=3) == 3
    rows = [model.switches.index(s) for s in widths.evaluated]
    others = [r for r in range(len(model.switches)) if r not in rows]
    assert stem.num_batches_tracked[rows].tolist() == [3] * len(rows)
    assert not stem.num_batches_tracked[others].any() and not stem.running_mean[others].any()
    assert not torch.equal(stem.running_mean[rows], trained[rows])
    images = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    outputs = model.eval()(images)
    for i, switch in enumerate(widths.evaluated):  # reference: the width built, loaded, calibrated alone
        alone = _model([str(switch)], seed=3).double()
        alone.load_state_dict(_one_switch_state(model, rows[i]))
        for norm in _norms(alone):
            norm.reset_running_stats()
        calibrate_batch_norm(alone, batches, batches=3)
        torch.testing.assert_close(outputs[i], alone.eval()(images)[0])


def test_train_command_reports_the_calibrated_evaluated_widths(tmp_path):
    out = tmp_path / "us"
    args = ["--model", "mobilenet_v1", "--dataset", "digits", "--width-mult", "0.25", "--batch-size", "256"]
    args += ["--switches", "1x1.0,2x0.5", "--epochs", "1", "--precision", "fp32", "--quiet", "--out", str(out)]
    cli.main(["train", *args, "--baseline", "universally-slimmable", "--slimmable-widths", "0.5,1.0"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"] == "universally-slimmable"
    assert list(metrics["switches"]) == ["1x1.0", "1x0.71875", "1x0.5"]
    model, checkpoint = load_checkpoint(out / "checkpoint.pt")  # an ordinary, deployable model
    assert len(checkpoint["switches"]) == 17 and set(checkpoint["accuracy"]) == set(metrics["switches"])
    norm = _norms(model)[0]
    torch.testing.assert_close(norm.weight, norm.weight[:1].expand_as(norm.weight))
    evaluated = [model.switches.index(s) for s in metrics["switches"]]
    calibrated = torch.zeros(len(model.switches), dtype=torch.long)
    calibrated[evaluated] = 1438 // 256  # every training batch (fewer than CALIBRATION_BATCHES), the rest reset
    assert torch.equal(norm.num_batches_tracked, calibrated)
    config = TrainConfig(
        model="mobilenet_v1",
        dataset="digits",
        width_mult=0.25,
        batch_size=256,
        switches=["1x1.0", "2x0.5"],
        precision="fp32",
        out=str(out),
        resume=True,
        baseline="universally-slimmable",
        slimmable_widths=["1/2", "1"],
    )
    trainer = build(config)[2]  # --resume loads the checkpoint into the shared model
    assert all(n.shares_affine for n in _norms(trainer.model))
    scores = evaluate(trainer.model.set_active(list(metrics["switches"])), trainer.val_loader)
    assert scores == {name: m["accuracy"] for name, m in metrics["switches"].items()}  # after calibration
