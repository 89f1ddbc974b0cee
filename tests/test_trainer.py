"""The trainer: outputs of a run, exact resume, schedule, super-resolution, baselines and BN calibration."""

import csv
import io
import json
import math
import sys
from fractions import Fraction

import pytest
import torch

from paradis_fast import cli
from paradis_fast.models import mobilenet_v1
from paradis_fast.nn import SlicedConv2d, SwitchBatchNorm2d
from paradis_fast.switches import Switch
from paradis_fast.train import TrainConfig, run
from paradis_fast.train.baselines import Sandwich, equal_cost_width, relative_cost, slimmable_switches
from paradis_fast.train.calibrate import calibrate_batch_norm
from paradis_fast.train.checkpoint import load_checkpoint
from paradis_fast.train.experiment import build
from paradis_fast.train import precision as precision_module
from paradis_fast.train.precision import Precision, cpu_capabilities, default_precision
from paradis_fast.train.trainer import make_optimizer, parameter_groups, warmup_cosine

TINY = dict(model="mobilenet_v1", dataset="digits", width_mult=0.25, batch_size=128, quiet=True)


class Interrupted(Exception):
    pass


def _parameters(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_continues_to_the_uninterrupted_result(tmp_path, precision):
    """Also under float16 autocast, whose loss scale is part of the state; weights stay float32."""
    config = dict(TINY, switches=["1x1.0", "0.5+0.25+0.25"], epochs=2, seed=5, precision=precision)
    straight = run(TrainConfig(**config, out=str(tmp_path / "straight")), log=lambda line: None)

    def crash_after_first_epoch(line):
        if line.startswith("epoch 1/2"):
            raise Interrupted

    with pytest.raises(Interrupted):
        run(TrainConfig(**config, out=str(tmp_path / "resumed")), log=crash_after_first_epoch)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    torch.manual_seed(1234)  # the global RNG state is restored from the checkpoint too
    resumed = run(TrainConfig(**config, out=str(tmp_path / "resumed"), resume=True), log=lambda line: None)

    assert resumed["switches"] == straight["switches"]
    a, b = _parameters(tmp_path / "straight" / "checkpoint.pt"), _parameters(tmp_path / "resumed" / "checkpoint.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert not a[key].is_floating_point() or a[key].dtype == torch.float32, key
    rows = list(csv.DictReader(open(tmp_path / "resumed" / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_run_writes_metrics_history_plots_and_a_deployable_checkpoint(tmp_path):
    result = run(TrainConfig(**TINY, switches=["1x1.0", "2x0.5"], epochs=1, out=str(tmp_path)), log=lambda line: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result))
    assert set(metrics["switches"]) == {"1x1.0", "2x0.5"}
    assert all(0 <= m["accuracy"] <= 1 for m in metrics["switches"].values())
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert len(rows) == 1 and float(rows[0]["accuracy:2x0.5"]) == metrics["switches"]["2x0.5"]["accuracy"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["1x1.0.png", "2x0.5.png"]
    assert (tmp_path / "plots" / "1x1.0.png").read_bytes()[:4] == b"\x89PNG"
    # deployment's loader rebuilds the trained model from the checkpoint
    model, checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["switches"] == ["1x1.0", "2x0.5"] and checkpoint["epoch"] == 1
    assert (
        checkpoint["input_shape"] == [1, 8, 8]
        and checkpoint["accuracy"]["2x0.5"] == metrics["switches"]["2x0.5"]["accuracy"]
    )
    assert set(checkpoint) >= {"optimizer", "scheduler", "rng", "config"}


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4:] == pytest.approx([0.4 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)])


def test_super_resolution_trains_with_psnr(tmp_path):
    config = TrainConfig(
        model="wdsr_a",
        dataset="photos",
        switches=["1x1.0", "2x0.5"],
        width_mult=0.25,
        epochs=3,
        batch_size=16,
        optimizer="adamw",
        lr=3e-3,
        quiet=True,
        out=str(tmp_path),
        model_kwargs=dict(n_blocks=1),
        dataset_kwargs=dict(patch=24, train_patches=64, val_patches=16),
    )
    lines = []
    result = run(config, log=lines.append)
    assert set(result["switches"]) == {"1x1.0", "2x0.5"} and "bicubic_psnr" in result
    assert 15 < result["bicubic_psnr"] < 50
    history = [row["switches"]["1x1.0"] for row in torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"]]
    assert history[-1] > history[0], lines  # learning, measured in dB
    assert all(math.isfinite(m["psnr"]) for m in result["switches"].values())


def test_classifier_on_super_resolution_data_is_refused():
    with pytest.raises(ValueError, match="is a classifier"):
        run(TrainConfig(model="resnet20", dataset="photos", epochs=1, quiet=True))


def test_sandwich_rule_runs_widest_narrowest_and_random_middle():
    switches = ["1x1.0", "1x0.75", "1x0.625", "1x0.5", "1x0.25"]
    sandwich, generator = Sandwich(switches), torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        chosen = [str(s) for s in sandwich(generator)]
        assert chosen[0] == "1x1.0" and chosen[-1] == "1x0.25" and len(chosen) == 4
        seen.update(chosen[1:-1])
    assert seen == {"1x0.75", "1x0.625", "1x0.5"}


def test_slimmable_baseline_widths_match_paradis_costs():
    assert relative_cost(Switch.parse("2x0.5")) == Fraction(1, 2)
    assert relative_cost(Switch.parse("0.5+0.25+0.25")) == Fraction(3, 8)
    assert equal_cost_width(Switch.parse("4x0.25")) == Fraction(1, 2)
    assert equal_cost_width(Switch.parse("2x0.5")) == Fraction(23, 32)  # sqrt(1/2) on a 1/32 grid
    widths = [str(s) for s in slimmable_switches(["1x1.0", "2x0.5", "4x0.25", "0.5+0.25+0.25"])]
    assert widths == ["1x1.0", "1x0.71875", "1x0.625", "1x0.5", "1x0.25"]


def test_baselines_share_the_trainer(tmp_path):
    config = dict(TINY, switches=["1x1.0", "2x0.5"], epochs=1)
    individual = run(TrainConfig(**config, baseline="individual", out=str(tmp_path / "ind")), log=lambda line: None)
    assert set(individual["switches"]) == {"1x1.0", "2x0.5"} and individual["baseline"] == "individual"
    alone = torch.load(tmp_path / "ind" / "individual" / "2x0.5" / "checkpoint.pt", weights_only=True)
    assert alone["switches"] == ["2x0.5"]
    slim = run(
        TrainConfig(**config, baseline="slimmable", slimmable_widths=["1.0", "0.75", "0.5", "0.25"]),
        log=lambda line: None,
    )
    assert list(slim["switches"]) == ["1x1.0", "1x0.75", "1x0.5", "1x0.25"]


def test_calibration_gives_the_exact_average_of_batch_statistics():
    torch.manual_seed(0)
    model = mobilenet_v1(
        num_classes=10, switches=["1x1.0", "0.3+0.7", "1x0.5"], width_mult=0.25, small_input=True, in_channels=1
    )
    batches = [(torch.randn(6, 1, 8, 8) + 0.5, torch.zeros(6, dtype=torch.long)) for _ in range(3)]
    stem_conv = next(m for m in model.modules() if isinstance(m, SlicedConv2d))
    stem_norm = next(m for m in model.modules() if isinstance(m, SwitchBatchNorm2d))
    outputs = []
    stem_conv.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    assert calibrate_batch_norm(model, batches, batches=5) == 3
    assert stem_norm.momentum == 0.1 and model.training
    stacked = torch.stack([o.unflatten(0, (3, 6)) for o in outputs])  # [batches, S, B, C, H, W]
    expected = stacked.mean((2, 4, 5)).mean(0)  # equal batches: mean of the batch means
    for s, switch in enumerate(model.switches):
        covered = switch.covered(stem_norm.num_features)
        torch.testing.assert_close(stem_norm.running_mean[s, :covered], expected[s, :covered])
    var = stacked.var((2, 4, 5), unbiased=False) * (6 * 64) / (6 * 64 - 1)
    torch.testing.assert_close(stem_norm.running_var[0], var[:, 0].mean(0))
    assert torch.equal(stem_norm.num_batches_tracked, torch.full((3,), 3))


def test_calibrate_command(tmp_path, capsys):
    run(TrainConfig(**TINY, switches=["1x1.0", "2x0.5"], epochs=1, out=str(tmp_path)), log=lambda line: None)
    cli.main(["calibrate", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--batches", "2"])
    assert "on 2 batches of digits" in capsys.readouterr().out
    model, checkpoint = load_checkpoint(tmp_path / "checkpoint.calibrated.pt")
    norm = next(m for m in model.modules() if isinstance(m, SwitchBatchNorm2d))
    assert torch.equal(norm.num_batches_tracked, torch.full((2,), 2))
    assert set(checkpoint["accuracy"]) == {"1x1.0", "2x0.5"}


def test_build_rejects_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="exceeds the"):
        build(TrainConfig(**dict(TINY, batch_size=4096)))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal,quiet", [(True, False), (True, True), (False, False)])
def test_progress_bar_only_on_a_terminal_unless_quiet(monkeypatch, terminal, quiet):
    _, _, trainer = build(TrainConfig(**dict(TINY, quiet=quiet), switches=["1x1.0"], epochs=1), log=lambda line: None)
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    trainer.train_epoch(1)
    shown = stream.getvalue()
    if terminal and not quiet:
        assert "epoch 1/1" in shown and "loss=" in shown and "img_s=" in shown
    else:
        assert shown == ""


def test_float16_steps_with_inf_gradients_are_skipped_and_counted():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision("fp16")
    before = model.weight.detach().clone()
    with precision.autocast():
        loss = model(torch.full((1, 3), float("inf"))).float().sum()
    assert not precision.backward_and_step(loss, optimizer)
    assert precision.skipped_steps == 1 and torch.equal(model.weight, before)
    with precision.autocast():
        loss = model(torch.ones(1, 3)).float().sum()
    optimizer.zero_grad()
    assert precision.backward_and_step(loss, optimizer)
    assert precision.skipped_steps == 1 and not torch.equal(model.weight, before)


@pytest.mark.parametrize(
    "units, default",
    [
        ({"amx_bf16": True, "avx512_bf16": True}, "bf16"),
        ({"amx_bf16": False, "avx512_bf16": True}, "fp32"),  # measured slower than fp32 (bench/README.md)
        ({"amx_bf16": False, "avx512_bf16": False}, "fp32"),
        ({}, "fp32"),
    ],
    ids=["amx", "avx512-bf16-only", "none", "unknown"],
)
def test_precision_names_and_defaults(monkeypatch, units, default):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        Precision("fp8")
    assert str(Precision("bf16")) == "bf16 autocast" and str(Precision("fp16")) == "fp16 autocast with loss scaling"
    assert set(units) <= set(cpu_capabilities())  # the names ATen reports
    monkeypatch.setattr(precision_module, "cpu_capabilities", lambda: units)
    assert default_precision(torch.device("cpu")) == default


def test_train_command_takes_precision(tmp_path, capsys):
    argv = ["train", "--model", "mobilenet_v1", "--width-mult", "0.25", "--epochs", "1", "--batch-size", "256"]
    cli.main([*argv, "--precision", "bf16", "--quiet", "--out", str(tmp_path)])
    assert "precision bf16 autocast" in capsys.readouterr().out
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["precision"]["name"] == "bf16"
    assert all(v.dtype == torch.float32 for v in state["state_dict"].values() if v.is_floating_point())


def test_weight_decay_spares_biases_norms_and_depthwise_filters():
    model = mobilenet_v1(10, ["1x1.0", "2x0.5"], width_mult=0.25, small_input=True)
    decayed, free = parameter_groups(model, 1e-3)
    assert (decayed["weight_decay"], free["weight_decay"]) == (1e-3, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    free_names = {names[id(p)] for p in free["params"]}
    assert decayed_names | free_names == set(names.values()) and not decayed_names & free_names
    sliced = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, SlicedConv2d)}
    assert decayed_names == sliced | {"classifier.weight"}
    assert "features.1.0.0.weight" in free_names  # the first depthwise filter
    assert any(isinstance(m, SwitchBatchNorm2d) for m in model.modules())
    optimizer = make_optimizer("sgd", model, 0.1, 1e-3)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]
