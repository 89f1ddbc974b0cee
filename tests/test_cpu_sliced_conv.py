"""The C++ `cpu` kernels of sliced_conv2d beyond the shared test matrix of test_sliced_conv.py:
larger images and the grouping of equal-width blocks into one convolution, the narrow-group
kernels, reproducibility with several threads, reduced precision and the kernel's own input
validation."""

from __future__ import annotations

import pytest
import torch

import conv_oracle
import test_sliced_conv as conv_tests
from conftest import cpu_has
from paradis_fast import SwitchSet
from paradis_fast.ops import available_backends, use_backend
from paradis_fast.ops.plan import conv_blocks, conv_output_size, live_taps
from paradis_fast.ops.sliced_conv import cut_kernel

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("sliced_conv2d"),
    reason="paradis_fast._C has no CPU sliced_conv2d kernel (extension not built)",
)

KERNEL = torch.ops.paradis


def case(
    switches,
    c_in,
    c_out,
    kernel,
    hw,
    stride=1,
    padding=None,
    dilation=1,
    batch=1,
    input_shared=False,
    bias=True,
    seed=0,
):
    padding = kernel // 2 if padding is None else padding
    return dict(
        seed=seed,
        switches=switches,
        c_in=c_in,
        c_out=c_out,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        batch=batch,
        input_shared=input_shared,
        bias=bias,
        hw=hw,
    )


# Larger images, in both layouts: equal-width switches (2x0.5, 4x0.25, 3x1/3) run as one grouped
# convolution, unequal ones (0.3+0.7, 0.5+0.25+0.25) block by block, the stem once per output range;
# channels_last 1x1 layers on images of <= 16 pixels (and one-pixel images in either layout) as one
# GEMM per block; on larger images (f32) on the pointwise GEMM kernels (AVX-512 CPUs).
LARGE_CASES = {
    "pointwise": case(["1x1.0", "2x0.5", "0.3+0.7"], 12, 10, 1, (16, 17), batch=2),
    "pointwise-small-image": case(["1x1.0", "0.5+0.25+0.25", "4x0.25"], 40, 24, 1, (3, 5), batch=3),  # GEMMs in nhwc
    "pointwise-one-pixel": case(["1x1.0", "0.5+0.25+0.25", "4x0.25"], 40, 24, 1, (1, 1), batch=3),  # GEMMs in both
    # 3 -> 2 channel blocks merged into block-diagonal products of <= 16 outputs; 150 -> 140 channels:
    # several passes over k, column tiles with a masked tail, row tiles with single-row leftovers
    # blocks of < 16 inputs and more outputs: the BLAS weight gradient as the transposed product
    "pointwise-expanding": case(["1x1.0", "0.25+0.75", "2x0.5"], 14, 40, 1, (3, 4), batch=3, seed=15),
    "pointwise-gemm-narrow": case(["1x1.0", "8x0.125", "0.5+0.25+0.25"], 24, 16, 1, (5, 7), batch=2, seed=7),
    "pointwise-gemm-wide": case(["1x1.0", "0.5+0.25+0.25"], 150, 140, 1, (4, 5), batch=3, seed=8),
    # stride > 1: the stride grid gathered, then as above (pointwise GEMM kernels; BLAS at 9 pixels)
    "pointwise-stride2": case(["4x0.25", "3x1/3"], 12, 9, 1, (33, 32), stride=2, bias=False),
    "pointwise-stride3-small": case(["1x1.0", "0.5+0.25+0.25"], 10, 14, 1, (7, 8), stride=3, batch=2, seed=9),
    "3x3-split-image": case(["1x1.0", "2x0.5"], 80, 6, 3, (20, 21), seed=1),
    "3x3-stride2-dilated": case(["0.5+0.25+0.25", "1x0.5"], 13, 11, 3, (36, 34), stride=2, dilation=2, padding=2),
    "shared-stem": case(["1x1.0", "2x0.5", "4x0.25"], 3, 16, 3, (16, 16), batch=2, input_shared=True),
    # outputs 6-11 read by no switch: their weight and bias gradients exactly zero
    "shared-stem-partial": case(["1x0.5", "0.25+0.25"], 3, 12, 3, (9, 10), batch=2, input_shared=True, seed=10),
    "5x5-asymmetric-padding-free": case(["2x0.5"], 6, 8, 5, (18, 20), padding=0, batch=3),
    # 3x3 units of 1-, 4- or 8-channel groups: narrow-group kernels in nhwc f32 (AVX-512 CPUs)
    "3x3-narrow-groups": case(["1x1.0", "2x0.5", "4x0.25"], 16, 16, 3, (7, 19), batch=2, seed=2),
    "3x3-narrow-unequal-pad0": case(["0.5+0.25+0.25", "4x0.25"], 32, 32, 3, (9, 14), padding=0, seed=3),
    "3x3-narrow-pad2-stride2": case(["4x0.25", "2x0.5"], 32, 32, 3, (11, 16), padding=2, stride=2, bias=False),
    "3x3-narrow-pad2": case(["4x0.25"], 16, 16, 3, (6, 9), padding=2, batch=3, seed=4),
    # one-channel groups (16 sub-networks of 16 channels): the kernels' depthwise case
    "3x3-narrow-1-channel-groups": case(["16x0.0625", "1x1.0"], 16, 16, 3, (9, 29), batch=2, seed=5),
    "3x3-narrow-1-channel-stride2": case(["16x0.0625"], 16, 16, 3, (10, 7), stride=2, bias=False, seed=6),
    # kernels as large as the image: the unfolded weight's GEMMs (NCHW, f32 and f64) are a candidate
    "5x5-small-image": case(["1x1.0", "0.5+0.25+0.25", "8x0.125"], 17, 19, 5, (4, 5), batch=3, seed=11),
    "5x5-small-image-pad1": case(["0.3+0.7", "1x0.5"], 9, 14, 5, (6, 3), padding=1, batch=2, seed=12),
    "3x3-small-stride2-dilated": case(["3x1/3", "1x1.0"], 13, 11, 3, (5, 6), stride=2, dilation=2, padding=2, seed=13),
    "1x1-two-by-two": case(["4x0.25", "0.5+0.25+0.25"], 9, 13, 1, (2, 2), batch=2, bias=False, seed=14),
}


@pytest.mark.parametrize("path", ["auto", "native", "masked", "grouped", "unfolded", "relayout"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(LARGE_CASES))
def test_large_image_paths_match_oracle(monkeypatch, name, dtype, layout, path):
    """Every path the per-shape choice can pick (and the choice itself) against the oracle."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", path)
    conv_case = LARGE_CASES[name]
    x, weight, bias, g = conv_tests.make_inputs(conv_case, dtype)
    x = x.contiguous(memory_format=layout)
    with use_backend("cpu"):
        (y, gx, gw, gb), (yr, gxr, gwr, gbr) = conv_tests.run_both(conv_case, x, weight, bias, g)
    tol = conv_tests.TOLERANCE[dtype]
    for got, want, what in ((y, yr, "forward"), (gx, gxr, "grad x"), (gw, gwr, "grad weight"), (gb, gbr, "grad bias")):
        if want is not None:
            torch.testing.assert_close(got, want.to(dtype), **tol, msg=lambda m: f"{what}: {m}")
    conv_tests.assert_uncovered_exact_zeros(conv_case, y, gx, gw, gb)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "name", ["shared-stem", "pointwise", "pointwise-stride2", "3x3-narrow-groups", "3x3-split-image"]
)
def test_kernels_return_the_layouts_the_fake_kernels_promise(name, layout):
    """y and grad_x in x's layout, the weight and bias gradients contiguous: compiled graphs trust the
    fake kernels' strides (a channels_last weight gradient broke a weight-normed stem's gradients)."""
    conv_case = LARGE_CASES[name]
    x, weight, bias, g = conv_tests.make_inputs(conv_case, torch.float32)
    x = x.contiguous(memory_format=layout)
    switches = SwitchSet(conv_case["switches"])
    geometry = (
        [conv_case["stride"]] * 2,
        [conv_case["padding"]] * 2,
        [conv_case["dilation"]] * 2,
        conv_case["input_shared"],
    )
    blocks = list(conv_blocks(switches, conv_case["c_in"], conv_case["c_out"], conv_case["input_shared"]))
    y = KERNEL.sliced_conv2d(x, weight, bias, blocks, len(switches), *geometry)
    grad_y = torch.randn(y.shape, generator=g).contiguous(memory_format=layout)
    gx, gw, gb = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, len(switches), *geometry, [True, True, True])
    assert y.is_contiguous(memory_format=layout) and gx.is_contiguous(memory_format=layout)
    assert gw.is_contiguous() and gb.is_contiguous()


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "kernel, hw, c_in, c_out",
    [(1, (16, 16), 48, 64), (1, (3, 3), 48, 64), (3, (16, 16), 48, 64), (3, (12, 12), 16, 16)],
    ids=["1x1-large", "1x1-small", "3x3", "3x3-narrow-groups"],
)
def test_gradients_bit_identical_across_runs_with_two_threads(two_threads, kernel, hw, c_in, c_out, layout):
    g = torch.Generator().manual_seed(7)
    switches = SwitchSet(["1x1.0", "2x0.5", "0.3+0.7", "4x0.25"])
    x = torch.randn(len(switches) * 8, c_in, *hw, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g)
    blocks = list(conv_blocks(switches, c_in, c_out, False))
    geometry = ([1, 1], [kernel // 2] * 2, [1, 1], False)
    grad_y = torch.randn(KERNEL.sliced_conv2d(x, weight, None, blocks, len(switches), *geometry).shape, generator=g)
    runs = [
        KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, len(switches), *geometry, [True, True, True])
        for _ in range(3)
    ]
    for other in runs[1:]:
        for first, again, what in zip(runs[0], other, ("grad x", "grad weight", "grad bias")):
            assert torch.equal(first, again), f"{what} differs between identical runs"


@pytest.mark.skipif(
    not cpu_has("avx512f"), reason="the narrow-group kernels need AVX-512F; this CPU runs oneDNN for them"
)
@pytest.mark.parametrize("isa, dnnl_calls", [("native", 1), ("baseline", 3)])
def test_narrow_group_units_skip_onednn(monkeypatch, isa, dnnl_calls):
    """The 2x0.5 and 4x0.25 units of a 16-channel 3x3 layer (nhwc f32) run on the narrow-group
    kernels, not oneDNN; only the dense 1x1.0 unit calls aten::convolution(_backward), unless
    PARADIS_CPU_ISA=baseline, where all three do and the results agree."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "native")  # the fixed rules, not the per-shape choice
    switches = SwitchSet(["1x1.0", "2x0.5", "4x0.25"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3 * 4, 16, 10, 13, generator=g).contiguous(memory_format=torch.channels_last)
    weight, grad_y = torch.randn(16, 16, 3, 3, generator=g), torch.randn(3 * 4, 16, 10, 13, generator=g)
    blocks, geometry = list(conv_blocks(switches, 16, 16, False)), ([1, 1], [1, 1], [1, 1], False)
    if isa == "baseline":
        monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")
    with torch.profiler.profile() as prof:
        y = KERNEL.sliced_conv2d(x, weight, None, blocks, 3, *geometry)
        gx, gw, _ = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 3, *geometry, [True, True, False])
    names = [event.name for event in prof.events()]
    assert names.count("aten::convolution") == dnnl_calls
    assert names.count("aten::convolution_backward") == dnnl_calls
    monkeypatch.setenv("PARADIS_CPU_ISA", "native" if isa == "baseline" else "baseline")
    y_other = KERNEL.sliced_conv2d(x, weight, None, blocks, 3, *geometry)
    gx_other, gw_other, _ = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 3, *geometry, [True, True, False])
    for got, want in ((y, y_other), (gx, gx_other), (gw, gw_other)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


POINTWISE_GEOMETRY = ([1, 1], [0, 0], [1, 1], False)  # stride, padding, dilation, input_shared


def _pointwise_problem(specs, batch, c_in, c_out, hw, seed):
    """Random channels_last x and grad_y of a 1x1 layer over the switches `specs`, its weight and
    block table."""
    switches, g = SwitchSet(specs), torch.Generator().manual_seed(seed)
    x = torch.randn(len(switches) * batch, c_in, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g)
    grad_y = torch.randn(len(switches) * batch, c_out, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    return x, weight, grad_y, list(conv_blocks(switches, c_in, c_out, False))


@pytest.mark.skipif(
    not cpu_has("avx512f"), reason="the pointwise GEMM kernels need AVX-512F; this CPU runs oneDNN for them"
)
@pytest.mark.parametrize(
    "batch, hw, ours",
    [(2, (6, 5), True), (64, (4, 4), True), (8, (4, 4), False)],
    ids=["30px", "16px-1024-rows", "16px-128-rows"],
)
def test_pointwise_gemm_kernels_replace_onednn_and_agree_with_baseline(monkeypatch, batch, hw, ours):
    """A channels_last float32 1x1 layer runs on the pointwise GEMM kernels, with no ATen
    convolution or GEMM, on images of more than 16 pixels or with at least 1024 pixel rows per
    switch; on fewer rows of small images on BLAS; under PARADIS_CPU_ISA=baseline on ATen, with the
    same results."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "native")  # the fixed rules, not the per-shape choice
    x, weight, grad_y, blocks = _pointwise_problem(["1x1.0", "2x0.5", "0.5+0.25+0.25"], batch, 40, 36, hw, seed=4)
    bias = torch.randn(36, generator=torch.Generator().manual_seed(4))

    def run():
        with torch.profiler.profile() as prof:
            y = KERNEL.sliced_conv2d(x, weight, bias, blocks, 3, *POINTWISE_GEOMETRY)
            grads = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 3, *POINTWISE_GEOMETRY, [True, True, True])
        names = {event.name for event in prof.events()}
        return (y, *grads), names & {"aten::convolution", "aten::convolution_backward", "aten::mm", "aten::addmm"}

    native, aten_calls = run()
    assert (not aten_calls) == ours, aten_calls
    monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")
    baseline, aten_calls = run()
    assert aten_calls
    for got, want, what in zip(native, baseline, ("forward", "grad x", "grad weight", "grad bias")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("isa", ["native", "baseline"])
@pytest.mark.parametrize(
    "hw, stride",
    [((13, 12), (2, 3)), ((9, 8), (3, 3)), ((40, 37), (2, 2))],
    ids=["stride2x3-28px", "stride3-9px", "stride2-380px"],
)
def test_strided_pointwise_layers_run_as_gemms_on_the_gathered_grid(monkeypatch, hw, stride, isa, layout):
    """A 1x1 layer of stride > 1 gathers its stride grid and runs as a stride-1 layer on any CPU
    and image size, in either layout (pointwise GEMM kernels or BLAS; batched BLAS GEMMs over the
    images in NCHW): no ATen convolution; its input gradient is exactly zero off the grid; forward
    and gradients match the float64 oracle."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", "native")  # the fixed rules, not the per-shape choice
    monkeypatch.setenv("PARADIS_CPU_ISA", isa)
    names, g = ["1x1.0", "2x0.5", "0.5+0.25+0.25"], torch.Generator().manual_seed(10)
    x = torch.randn(6, 20, *hw, generator=g).contiguous(memory_format=layout)
    weight, bias = torch.randn(18, 20, 1, 1, generator=g), torch.randn(18, generator=g)
    blocks, geometry = list(conv_blocks(SwitchSet(names), 20, 18, False)), (list(stride), [0, 0], [1, 1], False)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    want_y = conv_oracle.oracle(*leaves, names, list(stride), [0, 0], [1, 1], False)
    grad_y = torch.randn(want_y.shape, generator=g)
    want = (want_y, *torch.autograd.grad(want_y, leaves, grad_y.double()))
    with torch.profiler.profile() as prof:
        y = KERNEL.sliced_conv2d(x, weight, bias, blocks, 3, *geometry)
        grads = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 3, *geometry, [True, True, True])
    assert not {event.name for event in prof.events()} & {"aten::convolution", "aten::convolution_backward"}
    assert y.is_contiguous(memory_format=layout)
    assert grads[0].is_contiguous(memory_format=layout)
    off_grid = torch.ones(hw, dtype=torch.bool)
    off_grid[:: stride[0], :: stride[1]] = False
    assert grads[0][:, :, off_grid].eq(0).all() and grads[0][:, :, ~off_grid].ne(0).any()
    for got, expected, what in zip((y, *grads), want, ("forward", "grad x", "grad weight", "grad bias")):
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("path", ["native", "masked", "grouped", "relayout"])
def test_dilation_along_a_one_tap_kernel_side_is_dropped(monkeypatch, path):
    """A kernel one tap wide with a dilation along that side is the layer without it: the kernel
    runs it so (oneDNN's AVX2 channels_last convolution segfaulted on this layer, dilated: stride 2,
    odd padding, a bias), every path, forward and gradients against the float64 oracle, which
    convolves with the dilation as given."""
    monkeypatch.setenv("PARADIS_CPU_CONV_PATH", path)
    names, g = ["4x0.25", "2x0.5"], torch.Generator().manual_seed(11)
    x = torch.randn(8, 68, 11, 1, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(100, 68, 3, 1, generator=g), torch.randn(100, generator=g)
    blocks, geometry = list(conv_blocks(SwitchSet(names), 68, 100, False)), ([2, 2], [0, 3], [1, 2], False)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    want_y = conv_oracle.oracle(*leaves, names, *geometry)
    grad_y = torch.randn(want_y.shape, generator=g)
    want = (want_y, *torch.autograd.grad(want_y, leaves, grad_y.double()))
    y = KERNEL.sliced_conv2d(x, weight, bias, blocks, 2, *geometry)
    grads = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 2, *geometry, [True, True, True])
    for got, expected, what in zip((y, *grads), want, ("forward", "grad x", "grad weight", "grad bias")):
        torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.skipif(
    not cpu_has("avx512f"), reason="the pointwise GEMM kernels need AVX-512F; this CPU runs oneDNN for them"
)
def test_pointwise_outputs_larger_than_16_mib_are_streamed_correctly(monkeypatch):
    """y (42 MiB) and grad_x (21 MiB) go out through non-temporal stores where a tile's row is
    64-byte aligned, with masked stores for partial vectors (1x0.75: 72 of 96 channels, the rest
    zero) and unaligned blocks (24 channels at channel 72); the results match oneDNN's
    (PARADIS_CPU_ISA=baseline)."""
    specs = ["1x1.0", "0.5+0.25+0.25", "1x0.75"]
    x, weight, grad_y, blocks = _pointwise_problem(specs, 16, 48, 96, (48, 48), seed=6)

    def run():
        y = KERNEL.sliced_conv2d(x, weight, None, blocks, 3, *POINTWISE_GEOMETRY)
        grads = KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 3, *POINTWISE_GEOMETRY, [True, True, False])
        return y, grads[0], grads[1]

    native = run()
    monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")
    for got, want, what in zip(native, run(), ("forward", "grad x", "grad weight")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-3, msg=lambda m: f"{what}: {m}")


@pytest.mark.skipif(
    not cpu_has("avx512f"),
    reason="the pointwise kernels need AVX-512F; this CPU runs BLAS, whose sums follow the thread count",
)
def test_pointwise_weight_gradient_same_for_any_thread_count():
    """The weight gradient sums each block's rows over a fixed partition (several chunks here), so
    one thread and two give the same bits."""
    x, weight, grad_y, blocks = _pointwise_problem(["1x1.0", "2x0.5", "4x0.25"], 4, 32, 48, (24, 24), seed=5)
    previous = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            mask = [False, True, False]
            grads.append(KERNEL.sliced_conv2d_backward(grad_y, x, weight, blocks, 3, *POINTWISE_GEOMETRY, mask)[1])
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(grads[0], grads[1])


def test_backward_returns_only_requested_gradients():
    switches = SwitchSet(["2x0.5"])
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    grad_y = torch.randn(2, 6, 5, 5)
    blocks = list(conv_blocks(switches, 4, 6, False))
    grads = KERNEL.sliced_conv2d_backward(
        grad_y, x, weight, blocks, 1, [1, 1], [1, 1], [1, 1], False, [False, True, False]
    )
    assert grads[0] is None and grads[2] is None and grads[1].shape == weight.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_reduced_precision_computes_in_float32(dtype):
    conv_case = LARGE_CASES["pointwise"]
    x, weight, bias, g = conv_tests.make_inputs(conv_case, torch.float32)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with use_backend("cpu"):
        (y, gx, gw, gb), (yr, gxr, gwr, gbr) = conv_tests.run_both(conv_case, x, weight, bias, g)
    assert y.dtype == gx.dtype == gw.dtype == gb.dtype == dtype
    for got, want in ((y, yr), (gx, gxr), (gw, gwr), (gb, gbr)):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-1)


# ------------------------------------------------------------------------- kernel validation
def _call(blocks=(0, 0, 4, 0, 6), num_switches=1, x_shape=(2, 4, 5, 5), shared=False, **geometry):
    x, weight = torch.randn(*x_shape), torch.randn(6, 4, 3, 3)
    stride, padding, dilation = (
        geometry.get("stride", [1, 1]),
        geometry.get("padding", [1, 1]),
        geometry.get("dilation", [1, 1]),
    )
    return KERNEL.sliced_conv2d(x, weight, None, list(blocks), num_switches, stride, padding, dilation, shared)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(blocks=(0, 0, 4, 0)), r"5 ints per block"),
        (dict(blocks=(1, 0, 4, 0, 6)), r"block 0 \(1, 0, 4, 0, 6\) is outside 1 switches"),
        (dict(blocks=(0, 0, 5, 0, 6)), r"is outside .* 4 inputs"),
        (dict(blocks=(0, 2, 2, 0, 6)), r"is outside"),
        (dict(blocks=(0, 0, 2, 0, 4, 0, 1, 4, 3, 6)), r"blocks of switch 0 overlap"),
        (dict(blocks=(0, 0, 2, 0, 6), shared=True), r"input_shared every block reads all 4 input channels"),
        (dict(num_switches=3, blocks=(0, 0, 4, 0, 6)), r"2 rows, not a multiple of the 3 switches"),
        (dict(stride=[1]), r"must have 2 entries"),
        (dict(stride=[0, 1]), r"must be >= 1"),
        (dict(padding=[0, 0], x_shape=(2, 4, 2, 5)), r"smaller than the kernel"),
        (dict(x_shape=(2, 3, 5, 5)), r"x has 3 channels but weight expects 4"),
    ],
)
def test_kernel_rejects_bad_tables_and_geometry(kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        _call(**kwargs)


def test_kernel_rejects_integer_and_mismatched_dtypes():
    blocks = [0, 0, 4, 0, 6]
    geometry = ([1, 1], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"x is Float but weight is Double"):
        KERNEL.sliced_conv2d(torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3).double(), None, blocks, 1, *geometry)
    with pytest.raises(RuntimeError, match=r"supports floating dtypes, got Int"):
        KERNEL.sliced_conv2d(
            torch.ones(2, 4, 5, 5, dtype=torch.int32),
            torch.ones(6, 4, 3, 3, dtype=torch.int32),
            None,
            blocks,
            1,
            *geometry,
        )
    with pytest.raises(RuntimeError, match=r"grad_y must be \[2, 6, 5, 5\]"):
        KERNEL.sliced_conv2d_backward(
            torch.randn(2, 6, 4, 5),
            torch.randn(2, 4, 5, 5),
            torch.randn(6, 4, 3, 3),
            blocks,
            1,
            *geometry,
            [True, True, True],
        )


# kernels that overhang small images: the op cuts them to the taps that read the image (live_taps)
OVERHANG_CASES = {
    "3x3-on-1px": case(["4x0.25", "3x1/3"], 151, 10, 3, (1, 1), padding=1, batch=3),
    "5x5-on-1x2-stride2": case(["1x1.0", "0.5+0.25+0.25"], 21, 13, 5, (1, 2), padding=2, stride=2, batch=2),
    "3x3-dilated-on-2x1": case(["2x0.5", "1x1.0"], 12, 14, 3, (2, 1), padding=2, dilation=2, batch=2, seed=1),
    "5x5-pad3-stride2-on-1px": case(["2x0.5"], 8, 6, 5, (1, 1), padding=3, stride=2, batch=2, bias=False),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(OVERHANG_CASES))
def test_kernels_overhanging_small_images_match_oracle(name, dtype, backend):
    """Cut to the taps that read the image, the layer computes the same outputs and gradients as
    the whole kernel (the float64 oracle convolves with all of it); the cut taps' weight gradient
    is exactly zero."""
    conv_case = OVERHANG_CASES[name]
    x, weight, bias, g = conv_tests.make_inputs(conv_case, dtype)
    with use_backend(backend):
        (y, gx, gw, gb), (yr, gxr, gwr, gbr) = conv_tests.run_both(conv_case, x, weight, bias, g)
    tol = conv_tests.TOLERANCE[dtype]
    for got, want, what in ((y, yr, "forward"), (gx, gxr, "grad x"), (gw, gwr, "grad weight"), (gb, gbr, "grad bias")):
        if want is not None:
            torch.testing.assert_close(got, want.to(dtype), **tol, msg=lambda m: f"{what}: {m}")
    stride, padding, dilation = ([conv_case[k]] * 2 for k in ("stride", "padding", "dilation"))
    cut, _ = cut_kernel(x, weight, stride, padding, dilation)
    assert cut.shape[2:] != weight.shape[2:]  # the case does overhang
    dead = torch.ones(weight.shape[2:], dtype=torch.bool)
    (h0, h1, _), (w0, w1, _) = (
        live_taps(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    )
    dead[h0:h1, w0:w1] = False
    assert torch.equal(gw[:, :, dead], torch.zeros_like(gw[:, :, dead]))


def test_live_taps_cut_only_taps_that_read_padding():
    """Brute force over small geometries: every tap outside the cut reads only padding for every
    output, and the cut convolution (its padding) equals the whole one."""
    import itertools

    import torch.nn.functional as F

    cuts = 0
    for size, k, s, p, d in itertools.product(range(1, 7), range(1, 6), range(1, 4), range(0, 4), range(1, 3)):
        outputs = conv_output_size(size, k, s, p, d)
        if outputs < 1:
            continue
        first, stop, padding = live_taps(size, k, s, p, d)
        for i in [*range(first), *range(stop, k)]:
            assert all(not 0 <= o * s - p + i * d < size for o in range(outputs)), (size, k, s, p, d, i)
        if (first, stop) == (0, k):
            continue
        cuts += 1
        x = torch.randn(1, 2, size, size, dtype=torch.float64)
        w = torch.randn(3, 2, k, k, dtype=torch.float64)
        want = F.conv2d(x, w, None, s, p, d)
        torch.testing.assert_close(F.conv2d(x, w[:, :, first:stop, first:stop], None, s, padding, d), want)
    assert cuts > 20
