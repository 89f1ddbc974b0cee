"""Normal use says nothing it need not: a training step (eager and torch.compiled), an export and the
report plots emit no warning of paradis_fast's making and no third-party noise that the package
triggers. A warning is ours when it is raised in a paradis_fast file, names one (dynamo cites the
line that called into it), or is a deprecation (of an API that the package calls)."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from torch import nn

import paradis_fast
from paradis_fast.cli import main
from paradis_fast.deploy.export import FORMATS
from paradis_fast.nn import SlicedConv2d, SwitchBatchNorm2d, Switchable
from paradis_fast.ops import checks, plan, sliced_conv
from paradis_fast.train import InplaceDistillationLoss, reports

from test_deploy_export import write_checkpoint

PACKAGE = os.path.dirname(os.path.abspath(paradis_fast.__file__))
OUR_FILES = sorted(
    {name for _, _, names in os.walk(PACKAGE) for name in names if name.endswith(".py") and name != "__init__.py"}
)
SWITCHES = ["1x1.0", "2x0.5"]


def of_our_making(records) -> list[str]:
    found = []
    for w in records:
        message = str(w.message)
        if (
            os.path.abspath(w.filename).startswith(PACKAGE)
            or any(f"{name}:" in message for name in OUR_FILES)
            or issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))
        ):
            found.append(f"{w.category.__name__} at {w.filename}:{w.lineno}: {message}")
    return found


class Tiny(Switchable):
    """Stem, pointwise layer and classifier: every paradis op of a classification step, compiled in seconds."""

    def __init__(self):
        super().__init__(SWITCHES)
        self.stem = SlicedConv2d(3, 4, 3, SWITCHES, padding=1, input_shared=True)
        self.bn1 = SwitchBatchNorm2d(4, SWITCHES, activation="relu")
        self.conv = SlicedConv2d(4, 4, 1, SWITCHES)
        self.bn2 = SwitchBatchNorm2d(4, SWITCHES, activation="relu")
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn2(self.conv(self.bn1(self.stem(x))))
        return self.classifier(y.mean((2, 3)).unflatten(0, (len(self.active), -1)))


def training_steps(model, step_model, steps=2):
    """`steps` SGD steps with in-place distillation; the warnings they raise, every one recorded."""
    torch.manual_seed(0)
    criterion = InplaceDistillationLoss(teacher=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss = criterion(step_model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert torch.isfinite(loss)
    return records


def test_eager_training_step_is_quiet():
    model = Tiny().train()
    assert of_our_making(training_steps(model, model)) == []


# torch.compile's first import of inductor raises torch's own deprecation (torch.utils.mkldnn), before any tracing.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_training_step_is_quiet():
    model = Tiny().train()
    assert of_our_making(training_steps(model, torch.compile(model))) == []


def test_plans_are_cached_in_eager_mode(monkeypatch):
    """Each layer's block table is built on its first call only: later calls of that signature reuse
    the checked call (sliced_conv._CHECKED), other calls of the same layout the cached plan."""
    plan.conv_blocks.cache_clear()
    monkeypatch.setattr(sliced_conv, "_CHECKED", checks.CheckedCalls())
    model = Tiny().train()
    model(torch.randn(2, 3, 6, 6))
    misses = plan.conv_blocks.cache_info().misses
    model(torch.randn(2, 3, 6, 6))
    assert misses == 2 and plan.conv_blocks.cache_info().misses == misses
    monkeypatch.setattr(sliced_conv, "_CHECKED", checks.CheckedCalls())
    model(torch.randn(2, 3, 5, 5))  # checked anew, the plans from the cache
    info = plan.conv_blocks.cache_info()
    assert info.misses == misses and info.hits >= 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny WDSR-B: its fusion takes the image too (two inputs sharing the batch axis) and its parts
    hold a channels_last weight, which are what torch warns about when exporting."""
    _, path = write_checkpoint(tmp_path_factory.mktemp("quiet"), "wdsr_b", ["1x1.0", "0.3+0.7"])
    return path


@pytest.mark.parametrize("fmt", ["torch-export", "onnx"])
def test_export_is_quiet(tmp_path, checkpoint, fmt, capfd, caplog):
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install onnx onnxscript)")
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        main(["export", "--checkpoint", str(checkpoint), "--switch", "0.3+0.7", "--format", fmt, "--out", str(out)])
    captured = capfd.readouterr()
    assert [f"{w.category.__name__}: {w.message}" for w in records] == []
    assert [record.getMessage() for record in caplog.records] == []
    assert captured.err == ""
    files = ", ".join(f"{name}{FORMATS[fmt]}" for name in ("part0", "part1", "fusion"))
    assert captured.out.splitlines() == [f"switch 0.3+0.7 of wdsr_b -> {out}: {files}, manifest.json"]


def test_export_filters_only_around_the_export():
    """The filters are scoped: after an export, torch's loggers and the warning filters are as before."""
    from paradis_fast.deploy import export

    filters_before = list(warnings.filters)
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    logger_filters = list(logger.filters)
    with export._quiet():
        assert len(logger.filters) == len(logger_filters) + 1
    assert warnings.filters == filters_before and logger.filters == logger_filters


def test_one_epoch_report_plot(tmp_path):
    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    history = [dict(epoch=1, loss=1.2, images_per_s=100.0, lr=0.1, switches={"1x1.0": 0.61, "0.3+0.7": 0.55})]
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        paths = reports.plot_history(str(tmp_path), history, "accuracy")
        figure = reports.history_figure(history, "1x1.0", "accuracy")
    assert [str(w.message) for w in records] == []
    assert sorted(os.path.basename(p) for p in paths) == ["0.3+0.7.png", "1x1.0.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    (axes,) = figure.axes
    assert list(axes.get_xticks()) == [1]  # the one epoch, not a fractional axis around it
    assert axes.get_lines()[0].get_marker() == "o"
    assert plt.get_fignums() == figures_before  # no pyplot figure left behind


def test_report_plot_has_integer_epoch_ticks():
    history = [dict(epoch=e, loss=1.0, images_per_s=1.0, lr=0.1, switches={"2x0.5": 0.5 + e / 100}) for e in (1, 2, 3)]
    ticks = reports.history_figure(history, "2x0.5", "accuracy").axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
