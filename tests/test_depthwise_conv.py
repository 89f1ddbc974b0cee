"""paradis_fast.ops.depthwise_conv2d and nn.DepthwiseConv2d against F.conv2d in float64: the
CPU kernels (weight gradient on images smaller than the kernel, bfloat16 / float16 input
gradient of strided layers, bfloat16 / float16 forward of tiny outputs; any kernel, stride,
padding, dilation and layout; AVX-512's narrow-group kernel for float32 3x3 layers of 16k
channels), ATen's forward and other gradients,
and the routing (the op on small images, strided layers and low-precision tensors only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paradis_fast.nn import DepthwiseConv2d
from paradis_fast.ops import available_backends, depthwise_conv2d, use_backend

NATIVE = "cpu" in available_backends("depthwise_conv2d")
needs_native = pytest.mark.skipif(not NATIVE, reason="paradis_fast._C has no CPU depthwise_conv2d kernel (not built)")


# (channels, (H, W), kernel, stride, padding, dilation, bias, batch)
CASES = {
    "16ch": (16, (7, 9), 3, 1, 1, 1, False, 3),
    "32ch-stride2-bias": (32, (8, 5), 3, 2, 1, 1, True, 2),
    "48ch-pad0": (48, (6, 6), 3, 1, 0, 1, True, 2),
    "16ch-stride2-pad2": (16, (5, 11), 3, 2, 2, 1, False, 3),
    "64ch-2x2-image": (64, (2, 2), 3, 1, 1, 1, False, 5),  # a deep layer of small_input MobileNet
    "32ch-1x1-image": (32, (1, 1), 3, 1, 1, 1, True, 6),  # MobileNet on 8x8 digits; channels innermost in NCHW too
    "16ch-1x1-image-stride2": (16, (1, 1), 3, 2, 1, 1, False, 4),
    "odd-19ch": (19, (6, 7), 3, 1, 1, 1, True, 2),  # not a multiple of 16
    "5x5": (32, (9, 8), 5, 1, 2, 1, False, 2),
    "dilated": (16, (9, 10), 3, 1, 2, 2, True, 2),
    "131ch-2x3-stride2": (131, (2, 3), 3, 2, 1, 1, True, 3),  # channel blocks of 64 and a tail of 3
    "70ch-5x5-on-3x3": (70, (3, 3), 5, 1, 2, 1, False, 2),  # a kernel larger than the image
    "9ch-dilated-on-2x2": (9, (2, 2), 3, 1, 2, 2, False, 3),  # taps reading only padding
}
TOLERANCE = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    # bfloat16 has 8 bits of mantissa; ATen's CPU float16 gradients round partial sums to float16
    # (our kernels sum in float32), so the absolute error follows the terms' size, not the result's
    torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=1.6e-2),
}
# The op's own gradient kernels: float32 sums rounded once to the dtype (1 ulp, plus the rounding
# of the oracle's result to the dtype).
FLOAT32_SUMS = {**TOLERANCE, torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float16: dict(rtol=1e-3, atol=1e-3)}
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}


def make_case(name, dtype, layout, seed=0):
    channels, hw, kernel, stride, padding, dilation, bias, batch = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *hw, generator=g, dtype=dtype).contiguous(memory_format=layout)
    weight = torch.randn(channels, 1, kernel, kernel, generator=g, dtype=dtype)
    b = torch.randn(channels, generator=g, dtype=dtype) if bias else None
    return x, weight, b, dict(stride=stride, padding=padding, dilation=dilation)


def grad_y_for(y, dtype):
    """The output gradient of the tests: seeded, with values representable in dtype (the case's)."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(y.dtype)


def forward_backward(fn, x, weight, bias, dtype=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    y = fn(*leaves)
    y.backward(grad_y_for(y, dtype or y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def oracle(x, weight, bias, geometry):
    """F.conv2d in float64, gradients by autograd."""
    double = [t.double() if t is not None else None for t in (x, weight, bias)]
    return forward_backward(lambda *t: F.conv2d(*t, **geometry, groups=x.shape[1]), *double, dtype=x.dtype)


def through_op(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """The paradis op itself, whatever the image size (the public function routes large ones away)."""
    return torch.ops.paradis.depthwise_conv2d(x, weight, bias, [stride] * 2, [padding] * 2, [dilation] * 2)


ENTRIES = {"public": depthwise_conv2d, "op": pytest.param(through_op, marks=needs_native)}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("entry", ENTRIES.values(), ids=list(ENTRIES))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_oracle(name, entry, dtype, layout):
    x, weight, bias, geometry = make_case(name, dtype, layout)
    got = forward_backward(lambda *t: entry(*t, **geometry), x, weight, bias)
    want = oracle(x, weight, bias, geometry)
    for what, g, w in zip(("y", "grad x", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(g, w.to(dtype), **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")
    assert got[0].is_contiguous(memory_format=layout) and got[1].is_contiguous(memory_format=layout)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_weight_gradient_bit_identical_across_runs_and_threads(threads):
    x, weight, _, geometry = make_case("32ch-stride2-bias", torch.float32, torch.channels_last)
    x = torch.randn(24, 32, 15, 13, generator=torch.Generator().manual_seed(2)).contiguous(
        memory_format=torch.channels_last
    )
    grad_y = torch.randn(24, 32, 8, 7, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last
    )
    args = ([2, 2], [1, 1], [1, 1], [False, True, False])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        first = torch.ops.paradis.depthwise_conv2d_backward(grad_y, x, weight, *args)[1]
        again = torch.ops.paradis.depthwise_conv2d_backward(grad_y, x, weight, *args)[1]
        torch.set_num_threads(1 if threads == 2 else 2)
        other_threads = torch.ops.paradis.depthwise_conv2d_backward(grad_y, x, weight, *args)[1]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(first, again) and torch.equal(first, other_threads)


@needs_native
@pytest.mark.parametrize(
    "case, layout",
    [
        ("64ch-2x2-image", torch.channels_last),
        ("32ch-1x1-image", torch.contiguous_format),
        ("131ch-2x3-stride2", torch.contiguous_format),
    ],
    ids=["nhwc", "one-pixel-nchw", "nchw"],
)
def test_weight_gradient_skips_onednn(monkeypatch, case, layout):
    """On images smaller than the kernel (oneDNN's slowest case) the weight gradient alone (x needs
    none) runs the CPU kernels, no aten::convolution_backward, in either layout; the baseline
    kernels (PARADIS_CPU_ISA=baseline) agree with the native ones."""
    x, weight, _, geometry = make_case(case, torch.float32, layout)
    weight.requires_grad_()
    grads = []
    for isa in ("native", "baseline"):
        monkeypatch.setenv("PARADIS_CPU_ISA", isa)
        with torch.profiler.profile() as prof:
            through_op(x, weight, None, **geometry).sum().backward()
        names = [event.name for event in prof.events()]
        assert names.count("paradis::depthwise_conv2d_backward") == 1
        assert names.count("aten::convolution_backward") == 0
        grads.append(weight.grad)
        weight.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["32ch-stride2-bias", "16ch-stride2-pad2", "131ch-2x3-stride2"])
def test_low_precision_strided_input_gradient_skips_onednn(monkeypatch, case, layout, dtype):
    """The bfloat16 / float16 input gradient of a strided layer (x alone needs one) runs the CPU
    kernel, no aten::convolution_backward, in x's layout; the baseline kernels agree with the
    native ones and both with the float64 oracle."""
    x, weight, bias, geometry = make_case(case, dtype, layout)
    x.requires_grad_()
    want = oracle(x, weight, bias, geometry)[1]
    for isa in ("native", "baseline"):
        monkeypatch.setenv("PARADIS_CPU_ISA", isa)
        with torch.profiler.profile() as prof:
            y = through_op(x, weight, bias, **geometry)
            (grad_x,) = torch.autograd.grad(y, x, grad_y_for(y, dtype))
        names = [event.name for event in prof.events()]
        assert names.count("paradis::depthwise_conv2d_backward") == 1
        assert names.count("aten::convolution_backward") == 0
        assert grad_x.dtype == dtype and grad_x.is_contiguous(memory_format=layout)
        torch.testing.assert_close(grad_x, want.to(dtype), **TOLERANCE[dtype])


@needs_native
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["16ch", "5x5", "dilated", "odd-19ch", "131ch-2x3-stride2"])
def test_without_onednn_every_pass_is_own(monkeypatch, case, layout, dtype):
    """Where oneDNN does not compute the dtype (here: turned off), the forward and every gradient,
    stride 1 too, run the CPU kernels (ATen's would run a convolution per channel, and round
    bfloat16 / float16 partial sums to the dtype): no aten::convolution(_backward), float32 or
    wider sums within the dtype's rounding of the float64 oracle, through the public function as
    through the op, baseline kernels included."""
    x, weight, bias, geometry = make_case(case, dtype, layout)
    want = oracle(x, weight, bias, geometry)
    for isa in ("native", "baseline"):
        monkeypatch.setenv("PARADIS_CPU_ISA", isa)
        with torch.backends.mkldnn.flags(enabled=False), torch.profiler.profile() as prof:
            got = forward_backward(lambda *t: depthwise_conv2d(*t, **geometry), x, weight, bias)
        names = [event.name for event in prof.events()]
        assert names.count("paradis::depthwise_conv2d_backward") == 1
        assert names.count("aten::convolution_backward") == 0 and names.count("aten::convolution") == 0
        for what, g, w in zip(("y", "grad x", "grad weight", "grad bias"), got, want):
            assert g is None or g.dtype == dtype, what
            torch.testing.assert_close(g, w.to(dtype), **FLOAT32_SUMS[dtype], msg=lambda m: f"{isa} {what}: {m}")
        assert got[0].is_contiguous(memory_format=layout)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "case, own",
    [
        ("64ch-2x2-image", True),
        ("32ch-1x1-image", True),
        ("16ch-1x1-image-stride2", True),
        ("131ch-2x3-stride2", True),  # a 1x2 output, channel blocks of 64 and a tail of 3
        ("9ch-dilated-on-2x2", True),
        ("70ch-5x5-on-3x3", False),  # 9 output pixels: oneDNN's forward
        ("32ch-stride2-bias", False),
    ],
)
def test_low_precision_forward_of_tiny_outputs_is_own(monkeypatch, case, own, layout, dtype):
    """The bfloat16 / float16 forward of outputs of at most 4 pixels (where oneDNN's fixed costs
    dominate) runs the CPU kernel, no aten::convolution, in x's layout, with float32 sums; larger
    outputs run oneDNN's (where it is on: conftest turns it off on CPUs without AVX-512, and then
    every low-precision forward is the kernel's). Baseline kernels too."""
    own = own or not torch.backends.mkldnn.enabled
    x, weight, bias, geometry = make_case(case, dtype, layout)
    want = oracle(x, weight, bias, geometry)[0]
    for isa in ("native", "baseline"):
        monkeypatch.setenv("PARADIS_CPU_ISA", isa)
        monkeypatch.setenv("PARADIS_CPU_LOW_PRECISION", "native")  # oneDNN computes the dtype
        with torch.profiler.profile() as prof:
            y = through_op(x, weight, bias, **geometry)
        names = [event.name for event in prof.events()]
        assert names.count("aten::convolution") == (0 if own else 1), isa
        assert y.dtype == dtype and y.is_contiguous(memory_format=layout)
        tolerance = FLOAT32_SUMS[dtype] if own else TOLERANCE[dtype]
        torch.testing.assert_close(y, want.to(dtype), **tolerance, msg=lambda m: f"{isa}: {m}")


@needs_native
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_opcheck(layout):
    x, weight, bias, _ = make_case("32ch-stride2-bias", torch.float32, layout)
    for t in (x, weight, bias):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.paradis.depthwise_conv2d.default, (x, weight, bias, [2, 2], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.paradis.depthwise_conv2d.default, (x, weight, None, [1, 1], [0, 0], [1, 1]))


@pytest.mark.parametrize(
    "case, backend, through_op, dtype, onednn",
    [
        ("64ch-2x2-image", None, NATIVE, torch.float32, True),
        ("32ch-1x1-image", "cpu", NATIVE, torch.float32, True),
        ("64ch-2x2-image", "reference", False, torch.float32, True),
        ("16ch", None, NATIVE and not torch.backends.mkldnn.is_available(), torch.float32, True),
        ("16ch", None, NATIVE, torch.float32, False),
        ("16ch", None, NATIVE, torch.float64, True),
        ("16ch-stride2-pad2", None, NATIVE, torch.float32, True),
        ("16ch", None, NATIVE, torch.bfloat16, True),
    ],
    ids=[
        "small-image",
        "small-image-forced-cpu",
        "reference-backend",
        "large-image",
        "large-image-onednn-off",
        "large-image-f64",
        "large-image-strided",
        "bf16",
    ],
)
def test_routing(case, backend, through_op, dtype, onednn):
    """Small images, strided layers and CPU tensors other than float32 on oneDNN (low precision,
    float64, oneDNN off) go through the paradis op on the cpu backend; larger float32 images of
    stride 1 on oneDNN and backends with no depthwise kernel (reference) are F.conv2d itself."""
    x, weight, _, geometry = make_case(case, dtype, torch.channels_last)
    with torch.backends.mkldnn.flags(enabled=onednn), use_backend(backend), torch.profiler.profile() as prof:
        y = depthwise_conv2d(x, weight, None, **geometry)
    assert any(event.name == "paradis::depthwise_conv2d" for event in prof.events()) == through_op
    torch.testing.assert_close(y, F.conv2d(x, weight, None, **geometry, groups=x.shape[1]))


def test_module_is_a_grouped_conv2d():
    torch.manual_seed(0)
    module = DepthwiseConv2d(32, 3, stride=2, padding=1, bias=True)
    stock = nn.Conv2d(32, 32, 3, 2, 1, groups=32, bias=True)
    assert isinstance(module, nn.Conv2d) and module.groups == 32
    assert stock.load_state_dict(module.state_dict()) is not None
    x = torch.randn(3, 32, 9, 10).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(module(x), stock(x))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=torch.randn(2, 16, 5)), ValueError, "x must be 4-D"),
        (dict(weight=torch.randn(16, 2, 3, 3)), ValueError, r"weight must be \[C, 1, kh, kw\] with C = 16"),
        (dict(weight=torch.randn(8, 1, 3, 3)), ValueError, "C = 16"),
        (dict(weight=torch.randn(16, 1, 3, 3, dtype=torch.float64)), TypeError, "mixed dtypes"),
        (dict(bias=torch.randn(15)), ValueError, r"bias must have shape \(16,\)"),
        (dict(x=torch.randn(2, 16, 2, 2), padding=0), ValueError, "smaller than the kernel"),
        (dict(stride=0), ValueError, "stride must be an int >= 1"),
        (dict(x=torch.randint(0, 3, (2, 16, 5, 5))), TypeError, "x must be a floating tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    args = dict(x=torch.randn(2, 16, 5, 5), weight=torch.randn(16, 1, 3, 3), bias=None, stride=1, padding=1)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        depthwise_conv2d(**args)


@needs_native
def test_compiled_calls_run_the_op_whatever_backend_is_forced():
    """torch.compile records the paradis op for small CPU images without reading the backend
    setting (forced backends are eager); forward and backward then run the CPU kernels."""
    x, weight, _, geometry = make_case("64ch-2x2-image", torch.float32, torch.channels_last)
    compiled = torch.compile(lambda x, w: depthwise_conv2d(x, w, None, **geometry), backend="aot_eager", fullgraph=True)
    leaf = weight.clone().requires_grad_()
    with use_backend("reference"), torch.profiler.profile() as prof:
        compiled(x, leaf).square().sum().backward()
    names = [event.name for event in prof.events()]
    assert "paradis::depthwise_conv2d" in names and "paradis::depthwise_conv2d_backward" in names
    expected = weight.clone().requires_grad_()
    F.conv2d(x, expected, None, **geometry, groups=x.shape[1]).square().sum().backward()
    torch.testing.assert_close(leaf.grad, expected.grad, rtol=1e-4, atol=1e-4)
