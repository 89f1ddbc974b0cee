"""The CPU sliced_conv2d's per-shape choice between its paths (csrc/cpu/measured_choice.h): measured
on a shape's first call, kept after, forced by PARADIS_CPU_CONV_PATH, reported by
paradis_fast.ops.explain. Every path's numbers are checked against the float64 oracle in
test_cpu_sliced_conv.py (test_large_image_paths_match_oracle runs each forced)."""

from __future__ import annotations

import pytest
import torch

from paradis_fast import SwitchSet
from paradis_fast.ops import available_backends, explain, sliced_conv2d, use_backend
from paradis_fast.ops.plan import conv_blocks

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("sliced_conv2d"),
    reason="paradis_fast._C has no CPU sliced_conv2d kernel (extension not built)",
)
SWITCHES = ["1x1.0", "0.5+0.25+0.25", "3x1/3"]


def layer(c_in, c_out, hw, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(SWITCHES) * batch, c_in, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randn(c_out, c_in, 3, 3, generator=g)


def forward_backward(x, weight):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    y = sliced_conv2d(*leaves, None, SWITCHES, 1, 1)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return y.detach(), leaves[0].grad, leaves[1].grad


def test_first_call_measures_both_paths_and_later_calls_keep_the_winner(monkeypatch):
    monkeypatch.delenv("PARADIS_CPU_CONV_PATH", raising=False)
    x, weight = layer(23, 17, (5, 7), seed=1)  # a shape no other test runs
    report = explain(x, weight, SWITCHES, 1, 1)
    lines = report.splitlines()
    assert lines[0] == "sliced_conv2d: cpu backend"
    given = [line for line in lines[1:] if "Float channels_last ->" in line]
    assert len(given) == 2 and "for forward 3x3" in given[0]
    assert "for backward (grad x yes, weight yes, bias no) 3x3" in given[1]
    for line in given:
        assert line.lstrip().split(" ")[0] in ("native", "masked", "grouped", "relayout") and "x [6, 23, 5, 7]" in line
        assert "(measured on the first call: native " in line
        assert ", masked " in line and ", grouped " in line and ", relayout " in line
    first = forward_backward(x, weight)
    for _ in range(2):
        for got, want in zip(forward_backward(x, weight), first):
            assert torch.equal(got, want)
    assert explain(x, weight, SWITCHES, 1, 1) == report  # the same choice, measured once


@pytest.mark.parametrize("path, dense_calls", [("masked", len(SWITCHES)), ("grouped", 1), ("native", 5)])
def test_forced_path_runs_and_is_reported(monkeypatch, path, dense_calls):
    """masked: one dense oneDNN convolution per switch; grouped: one convolution, the switches its
    groups; native (this layer): one oneDNN convolution per unit, 1 + 3 + 1 of them (the dense
    switch, the unequal 0.5+0.25+0.25's three blocks, the equal 3x1/3 as one grouped convolution)."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", path)
    x, weight = layer(24, 18, (6, 6), seed=2)
    weight = weight.requires_grad_()
    monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")  # no narrow-group kernels: units are oneDNN calls
    with torch.profiler.profile() as prof:
        sliced_conv2d(x, weight, None, SWITCHES, 1, 1).sum().backward()
    names = [event.name for event in prof.events()]
    assert names.count("aten::convolution") == dense_calls
    assert names.count("aten::convolution_backward") == dense_calls
    assert f"  {path} (forced by PARADIS_CPU_CONV_PATH) for forward" in explain(x, weight, SWITCHES, 1, 1)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 2, 1), (2, 1, 1), (1, 3, 2)])
def test_unfolded_path_is_one_gemm_per_block_and_right(monkeypatch, stride, padding, dilation):
    """Small NCHW images: the layer as products with the unfolded weight, one GEMM per block in
    the forward (every block of the 3 switches: 1 + 3 + 3), no convolution, and the oracle's
    numbers (float64) for y and every gradient."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "unfolded")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 14, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(10, 14, 5, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(10, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with torch.profiler.profile() as prof:
        y = sliced_conv2d(*leaves[:2], leaves[2], SWITCHES, stride, padding, dilation)
    names = [event.name for event in prof.events()]
    assert names.count("aten::addmm") == 7 and "aten::convolution" not in names
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y)
    expected = [t.clone().requires_grad_() for t in (x, weight, bias)]
    with use_backend("reference"):
        y_ref = sliced_conv2d(*expected[:2], expected[2], SWITCHES, stride, padding, dilation)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad, want.grad)
    report = explain(x, weight, SWITCHES, stride, padding, dilation, bias)
    assert report.count("  unfolded (forced by PARADIS_CPU_CONV_PATH) for") == 2


def test_input_shared_stem_has_one_path(monkeypatch):
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "masked")
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    report = explain(x, torch.randn(16, 3, 3, 3), SWITCHES, 1, 1, input_shared=True)
    assert report.count("native (the only path) for") == 2 and "input_shared" in report


def test_unknown_path_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "fastest")
    x, weight = layer(8, 8, (4, 4), seed=3)
    with pytest.raises(RuntimeError, match="PARADIS_CPU_CONV_PATH=fastest names no path; the paths are native, masked"):
        sliced_conv2d(x, weight, None, SWITCHES, 1, 1)


def test_explain_names_backends_without_a_choice():
    x, weight = layer(8, 8, (4, 4), seed=4)
    with use_backend("reference"):
        assert (
            explain(x, weight, SWITCHES, 1, 1) == "sliced_conv2d: reference backend (one path per op, nothing measured)"
        )


def test_kernel_choice_of_a_direct_op_call_is_reported_too(monkeypatch):
    """torch.ops.paradis.sliced_conv2d (as torch.compile and torch.export record it) decides the
    same way: the decision list names its shape."""
    monkeypatch.delenv("PARADIS_CPU_CONV_PATH", raising=False)
    from paradis_fast import _C

    x, weight = layer(11, 13, (3, 9), seed=5)
    blocks = list(conv_blocks(SwitchSet(SWITCHES), 11, 13, False))
    torch.ops.paradis.sliced_conv2d(x, weight, None, blocks, 3, [1, 1], [1, 1], [1, 1], False)
    assert "for forward 3x3 stride 1x1 padding 1x1 dilation 1x1, x [6, 11, 3, 9]" in _C.sliced_conv2d_decisions()[0]


@pytest.mark.parametrize("path", ["native", "masked"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_weight_gradient_comes_from_blas_without_avx512(monkeypatch, stride, path):
    """Without AVX-512 (PARADIS_CPU_ISA=baseline stands in for such a CPU) oneDNN's channels_last
    1x1 weight gradient hangs or crashes on some shapes: on either path the weight gradient of a
    channels_last 1x1 layer is a BLAS GEMM (the masked path: one per switch), and right."""
    monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", path)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 7, 12, 10, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(19, 7, 1, 1, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    with torch.profiler.profile() as prof:
        sliced_conv2d(*leaves, None, SWITCHES, stride).sum().backward()
    mm_calls = [event.name for event in prof.events()].count("aten::mm")
    assert mm_calls == len(SWITCHES) if path == "masked" else mm_calls > 0
    double = [t.double().requires_grad_() for t in (x, weight)]
    with use_backend("reference"):
        sliced_conv2d(*double, None, SWITCHES, stride).sum().backward()
    torch.testing.assert_close(leaves[1].grad, double[1].grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_layers_may_run_on_copies_in_the_other_layout(monkeypatch, layout):
    """A third candidate runs the op on copies of x and grad_y in the other layout (which choose
    again there, between native and masked); forced, it returns outputs and gradients in x's layout
    equal to the oracle's, and explain shows both decisions."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "relayout")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 10, 7, 5, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(14, 10, 3, 3, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weight)]
    y = sliced_conv2d(*leaves, None, SWITCHES, 1, 1)
    grad_y = torch.randn(y.shape, generator=g)
    y.backward(grad_y)
    assert y.is_contiguous(memory_format=layout) and leaves[0].grad.is_contiguous(memory_format=layout)
    double = [t.double().requires_grad_() for t in (x, weight)]
    with use_backend("reference"):
        want = sliced_conv2d(*double, None, SWITCHES, 1, 1)
    want.backward(grad_y.double())
    for got, expected in ((y, want), (leaves[0].grad, double[0].grad), (leaves[1].grad, double[1].grad)):
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
    lines = explain(x, weight, SWITCHES, 1, 1).splitlines()[1:]
    given, other = ("NCHW", "channels_last") if layout == torch.contiguous_format else ("channels_last", "NCHW")
    given_lines = [line for line in lines if f"Float {given} ->" in line]
    other_lines = [line for line in lines if f"Float {other} (relayout's copies) ->" in line]
    for pass_lines in (given_lines, other_lines):
        assert len(pass_lines) == 2 and " for forward" in pass_lines[0] and " for backward" in pass_lines[1]
    for given_line, other_line in zip(given_lines, other_lines):
        assert given_line.lstrip().startswith("relayout (forced by PARADIS_CPU_CONV_PATH)")
        assert "measured on the first call: native" in other_line and "relayout " not in other_line


def test_a_shape_in_both_layouts_is_measured_once_in_each(monkeypatch):
    """relayout runs the op on copies in the other layout, where it has other candidates than a
    direct call in that layout: those are decisions of their own, so calls in the two layouts do
    not overwrite each other's (a layer measured again on every call, its times counted as wins of
    new block tables until the shape's family took an unmeasured winner)."""
    monkeypatch.delenv("PARADIS_CPU_CONV_PATH", raising=False)
    x, weight = layer(13, 11, (4, 6), seed=8)  # a shape no other test runs
    nchw = x.contiguous()
    first = [explain(t, weight, SWITCHES, 1, 1) for t in (nchw, x)]
    for _ in range(2):
        for t in (nchw, x):
            forward_backward(t, weight)
    assert [explain(t, weight, SWITCHES, 1, 1) for t in (nchw, x)] == first
    for report in first:
        lines = report.splitlines()[1:]
        assert len(lines) >= 2 and all(", relayout " in line for line in lines if "(relayout's copies)" not in line)
        assert all("(measured on the first call: native " in line for line in lines)


def test_explain_takes_unpadded_layers(monkeypatch):
    """padding 0 (every 1x1 layer) is a valid layer to explain, not a bad argument."""
    monkeypatch.delenv("PARADIS_CPU_CONV_PATH", raising=False)
    x = torch.randn(6, 9, 4, 4)
    report = explain(x, torch.randn(12, 9, 1, 1), SWITCHES, 1, 0)
    assert "for forward 1x1 stride 1x1 padding 0x0 dilation 1x1, x [6, 9, 4, 4]" in report
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        explain(x, torch.randn(12, 9, 1, 1), SWITCHES, 1, -1)


def test_explain_shows_a_one_tap_side_undilated(monkeypatch):
    """The op runs a dilation along a one-tap kernel side as 1 (the same layer); explain finds the
    decisions under that geometry."""
    monkeypatch.delenv("PARADIS_CPU_CONV_PATH", raising=False)
    x = torch.randn(6, 9, 7, 5)
    report = explain(x, torch.randn(12, 9, 3, 1), SWITCHES, 1, 1, (2, 3))
    assert len(report.splitlines()) == 3
    assert "for forward 3x1 stride 1x1 padding 1x1 dilation 2x1, x [6, 9, 7, 5]" in report


def test_new_block_tables_of_a_measured_layer_shape_take_its_winner(monkeypatch):
    """A universally slimmable network's random widths make new block tables every step: after a
    few of a layer shape's tables are measured, new ones take the path that won most, unmeasured,
    and are computed right."""
    monkeypatch.delenv("PARADIS_CPU_CONV_PATH", raising=False)
    x, weight = layer(32, 32, (5, 3), seed=7)  # a shape no other test runs
    reports = []
    for width in ("0.25", "0.375", "0.5", "0.625", "0.75", "0.875"):
        switches = ["1x1.0", f"1x{width}"]
        leaves = [t.detach().clone().double().requires_grad_() for t in (x, weight)]
        y = sliced_conv2d(*leaves, None, switches, 1, 1)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        with use_backend("reference"):
            expected = [t.detach().clone().requires_grad_() for t in leaves]
            y_ref = sliced_conv2d(*expected, None, switches, 1, 1)
            y_ref.backward(torch.cos(torch.arange(y_ref.numel(), dtype=y.dtype)).view_as(y_ref))
        torch.testing.assert_close(y, y_ref)
        for got, want in zip(leaves, expected):
            torch.testing.assert_close(got.grad, want.grad)
        reports.append(explain(x.double(), weight.double(), switches, 1, 1))
    assert all("measured on the first call" in r for r in reports[:4])
    for report in reports[4:]:
        lines = [line for line in report.splitlines()[1:] if "x [6, 32, 5, 3]" in line]
        assert len(lines) == 2
        assert all("(the winner of the first 4 block tables measured for this layer shape)" in line for line in lines)
