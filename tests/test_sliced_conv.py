"""paradis::sliced_conv2d against an independent float64 oracle (DESIGN §3), on every backend.

The oracle is a block-masked dense convolution: for switch s, the mask M_s[C_out, C_in] is 1 on
the blocks (out_j x in_j) (on the rows out_j for every input with input_shared), and
y_s = conv2d(x_s, weight * M_s, bias * outmask_s). Its gradients come from autograd, so weight
gradients of overlapping blocks of different switches add up as they must.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from paradis_fast import Switch, SwitchSet
from paradis_fast.nn import SlicedConv2d
from paradis_fast.ops import sliced_conv, sliced_conv2d
from paradis_fast.ops.plan import conv_blocks

from conv_oracle import (
    TOLERANCE,
    assert_uncovered_exact_zeros,
    conv_args,
    leaf,
    make_inputs,
    oracle,
    run_both,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_masked_dense_oracle(conv_case, dtype, conv_backend):
    x, weight, bias, g = make_inputs(conv_case, dtype)
    (y, gx, gw, gb), (yr, gxr, gwr, gbr) = run_both(conv_case, x, weight, bias, g)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    assert y.shape == yr.shape
    torch.testing.assert_close(y, yr.to(dtype), **tol, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(gx, gxr.to(dtype), **tol, msg=lambda m: f"grad x: {m}")
    torch.testing.assert_close(gw, gwr.to(dtype), **tol, msg=lambda m: f"grad weight: {m}")
    if bias is not None:
        torch.testing.assert_close(gb, gbr.to(dtype), **tol, msg=lambda m: f"grad bias: {m}")
    assert_uncovered_exact_zeros(conv_case, y, gx, gw, gb)


def test_channels_last_matches_oracle(conv_case, conv_backend):
    """channels_last in, channels_last out (y and grad_x), whichever backend; the cpu backend runs
    its NHWC kernels on it. float64, so any indexing slip shows far above rounding."""
    if conv_backend == "triton":
        pytest.skip("no NHWC Triton kernel: the layout is converted in Python as for the reference, tested there")
    x, weight, bias, g = make_inputs(conv_case, torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    (y, gx, gw, gb), (yr, gxr, gwr, gbr) = run_both(conv_case, x, weight, bias, g)
    if x.dim() == 4 and not x.is_contiguous():  # a dense NHWC tensor that is not also NCHW
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        assert gx.is_contiguous(memory_format=torch.channels_last)
    tol = TOLERANCE[torch.float64]
    for got, want, what in zip((y, gx, gw, gb), (yr, gxr, gwr, gbr), ("forward", "grad x", "grad weight", "grad bias")):
        if want is not None:
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")
    assert_uncovered_exact_zeros(conv_case, y, gx, gw, gb)


NARROW_CASE = dict(
    seed=5,
    switches=["1x0.5", "2x0.25", "0.3+0.7"],
    c_in=13,
    c_out=7,
    kernel=3,
    stride=1,
    padding=1,
    dilation=1,
    batch=2,
    input_shared=False,
    bias=True,
    hw=(5, 4),
)


@pytest.mark.parametrize("input_shared", [False, True])
def test_uncovered_channels_are_exactly_zero(conv_backend, input_shared):
    case = dict(NARROW_CASE, input_shared=input_shared, c_in=3 if input_shared else 13)
    x, weight, bias, g = make_inputs(case, torch.float32)
    bias = bias * 10 + 5  # a bias that would show up in any uncovered channel it leaked into
    (y, gx, gw, gb), (yr, gxr, gwr, gbr) = run_both(case, x, weight, bias, g)
    assert_uncovered_exact_zeros(case, y, gx, gw, gb)
    batch = case["batch"]
    assert torch.count_nonzero(y[:batch, 4:]) == 0  # 1x0.5 of 7 channels covers 4
    assert torch.count_nonzero(y[batch : 2 * batch, 4:]) == 0  # 2x0.25 of 7 channels: [0, 2), [2, 4)
    torch.testing.assert_close(y, yr.float(), rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs(conv_backend):
    case = dict(NARROW_CASE, switches=["2x0.5", "0.5+0.25+0.25", "1x1.0"], batch=2)
    x, weight, bias, g = make_inputs(case, torch.float32)
    x = x.to(memory_format=torch.channels_last)
    weight = weight.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    bias = torch.stack([bias, -bias], 1)[:, 0]  # stride 2
    assert not weight.is_contiguous() and not bias.is_contiguous() and not x.is_contiguous()
    (y, gx, gw, gb), (yr, gxr, gwr, gbr) = run_both(case, x, weight, bias, g)
    for got, want, what in zip((y, gx, gw, gb), (yr, gxr, gwr, gbr), ("y", "grad x", "grad weight", "grad bias")):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


def test_switch_set_spellings_are_equivalent(conv_backend):
    x = torch.randn(4, 7, 5, 5)
    weight = torch.randn(5, 7, 3, 3)
    a = sliced_conv2d(x, weight, None, ["2x0.5", "1x1.0"], padding=1)
    b = sliced_conv2d(x, weight, None, SwitchSet(["0.5+0.5", "1"]), padding=(1, 1))
    c = sliced_conv2d(x, weight, None, ("2x.5", Switch.parse("1x1.0")), 1, 1, 1)
    assert torch.equal(a, b) and torch.equal(a, c)
    # a switch run alone is another layer shape, whose path (chosen per shape) may sum in another order
    single = sliced_conv2d(x[:2], weight, None, "2x0.5", padding=1)
    torch.testing.assert_close(single, a[:2], rtol=1e-6, atol=1e-6)


def test_full_width_switch_is_a_dense_convolution(conv_backend):
    x, weight, bias = torch.randn(3, 7, 6, 6), torch.randn(13, 7, 3, 3), torch.randn(13)
    y = sliced_conv2d(x, weight, bias, ["1x1.0"], stride=2, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, 2, 1), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- autograd machinery
OPCHECK_CASES = [
    dict(
        seed=11,
        switches=["2x0.5", "1x1.0"],
        c_in=5,
        c_out=7,
        kernel=3,
        stride=1,
        padding=1,
        dilation=1,
        batch=2,
        input_shared=False,
        bias=True,
        hw=(5, 5),
    ),
    dict(
        seed=12,
        switches=["0.3+0.7", "1x0.5"],
        c_in=3,
        c_out=7,
        kernel=3,
        stride=2,
        padding=0,
        dilation=1,
        batch=2,
        input_shared=True,
        bias=False,
        hw=(6, 5),
    ),
    dict(
        seed=13,
        switches=["3x1/3", "2x0.25"],
        c_in=13,
        c_out=5,
        kernel=1,
        stride=2,
        padding=1,
        dilation=2,
        batch=1,
        input_shared=False,
        bias=False,
        hw=(4, 4),
    ),
]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=["bias", "shared-stride2", "k1-dilated"])
def test_opcheck(case, conv_backend, layout):
    x, weight, bias, _ = make_inputs(case, torch.float32)
    x = x.contiguous(memory_format=layout)
    switches = SwitchSet(case["switches"])
    blocks = list(conv_blocks(switches, case["c_in"], case["c_out"], case["input_shared"]))
    stride, padding, dilation, shared = conv_args(case)
    args = (
        leaf(x),
        leaf(weight),
        leaf(bias),
        blocks,
        len(switches),
        [stride] * 2,
        [padding] * 2,
        [dilation] * 2,
        shared,
    )
    torch.library.opcheck(torch.ops.paradis.sliced_conv2d.default, args)


@pytest.mark.parametrize("input_shared", [False, True], ids=["stacked", "shared"])
def test_gradcheck(conv_backend, input_shared):
    g = torch.Generator().manual_seed(3)
    switches = ["2x0.5", "0.3+0.7"]
    x = torch.randn(2 if input_shared else 4, 3, 3, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    # fast mode (a random projection of the Jacobian) keeps the python-loop reference backend quick
    assert torch.autograd.gradcheck(
        lambda x, w, b: sliced_conv2d(x, w, b, switches, stride=2, padding=1, input_shared=input_shared),
        inputs,
        fast_mode=True,
    )


def test_grad_without_bias_and_partial_requires_grad(conv_backend):
    x, weight = torch.randn(4, 7, 5, 5), torch.randn(5, 7, 3, 3, requires_grad=True)
    sliced_conv2d(x, weight, None, ["2x0.5", "1x0.5"]).square().sum().backward()
    assert weight.grad is not None and x.grad is None
    x.requires_grad_()
    weight.grad = None
    frozen = weight.detach()
    sliced_conv2d(x, frozen, None, ["2x0.5", "1x0.5"]).square().sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad[2:, 4:]) == 0 and torch.count_nonzero(x.grad[2:, :4]) > 0


def test_weight_gradient_is_deterministic(conv_backend):
    g = torch.Generator().manual_seed(21)
    switches = ["1x1.0", "2x0.5", "0.5+0.25+0.25", "4x0.25"]
    x = torch.randn(len(switches) * 3, 13, 9, 9, generator=g)
    weight = torch.randn(13, 13, 3, 3, generator=g)
    bias = torch.randn(13, generator=g)
    grad_y = torch.randn(len(switches) * 3, 13, 9, 9, generator=g)
    grads = []
    for _ in range(2):
        w, b, xx = leaf(weight), leaf(bias), leaf(x)
        sliced_conv2d(xx, w, b, switches, padding=1).backward(grad_y)
        grads.append((w.grad, b.grad, xx.grad))
    assert torch.equal(grads[0][0], grads[1][0]), "weight gradient differs between identical runs"
    assert torch.equal(grads[0][1], grads[1][1]), "bias gradient differs between identical runs"
    assert torch.equal(grads[0][2], grads[1][2]), "input gradient differs between identical runs"


# ---------------------------------------------------------------------------------- bad inputs
def _good():
    return torch.randn(4, 6, 5, 5), torch.randn(8, 6, 3, 3), torch.randn(8)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda x, w, b, s: (x[0], w, b, s), ValueError, r"x must be 4-D"),
        (lambda x, w, b, s: (x[None], w, b, s), ValueError, r"x must be 4-D"),
        (lambda x, w, b, s: (x, w[:, :, 0], b, s), ValueError, r"weight must be 4-D"),
        (lambda x, w, b, s: (x[:, :5], w, b, s), ValueError, r"channel mismatch"),
        (lambda x, w, b, s: (x[:3], w, b, s), ValueError, r"3 rows, not a multiple of the 2 switches"),
        (lambda x, w, b, s: (x.double(), w, b, s), TypeError, r"mixed dtypes"),
        (lambda x, w, b, s: (x, w, b.double(), s), TypeError, r"mixed dtypes"),
        (lambda x, w, b, s: (x.tolist(), w, b, s), TypeError, r"x must be a torch.Tensor"),
        (lambda x, w, b, s: (x, w.numpy(), b, s), TypeError, r"weight must be a torch.Tensor"),
        (lambda x, w, b, s: (x.int(), w, b, s), TypeError, r"floating"),
        (lambda x, w, b, s: (x, w, b, []), ValueError, r"empty switch set"),
        (lambda x, w, b, s: (x, w, b, None), ValueError, r"empty switch set"),
        (lambda x, w, b, s: (x, w, b, ["2x0.5", "2x"]), ValueError, r"bad switch spec '2x'"),
        (lambda x, w, b, s: (x, w, b, ["2x0.5", "0.75+0.5"]), ValueError, r"sum to 5/4 > 1"),
        (lambda x, w, b, s: (x, w, b, ["2x0.5", "2x0.5"]), ValueError, r"appears twice"),
        (lambda x, w, b, s: (x, w, b[:7], s), ValueError, r"bias must have shape \(8,\)"),
        (lambda x, w, b, s: (x, w, b[None], s), ValueError, r"bias must have shape \(8,\)"),
        (lambda x, w, b, s: (x, w.to("meta"), b, s), ValueError, r"mixed devices.*meta"),
        (lambda x, w, b, s: (x.to("meta"), w, b, s), ValueError, r"mixed devices"),
        (lambda x, w, b, s: (x, w, b.to("meta"), s), ValueError, r"mixed devices"),
    ],
    ids=[
        "x-3d",
        "x-5d",
        "weight-3d",
        "channels",
        "rows",
        "dtype-x",
        "dtype-bias",
        "x-list",
        "weight-numpy",
        "int",
        "empty-set",
        "none-set",
        "spelling",
        "sum",
        "duplicate",
        "bias-short",
        "bias-2d",
        "meta-weight",
        "meta-x",
        "meta-bias",
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, message):
    x, w, b, s = mutate(*_good(), ["2x0.5", "1x1.0"])
    with pytest.raises(error, match=message):
        sliced_conv2d(x, w, b, s, padding=1)


def test_empty_slice_names_the_channels_and_switch():
    x, w = torch.randn(2, 6, 5, 5), torch.randn(3, 6, 1, 1)  # 4x0.25 of 3 output channels
    with pytest.raises(ValueError, match=r"4x0\.25.*empty slice.* 3 channels"):
        sliced_conv2d(x, w, None, ["4x0.25"])
    x, w = torch.randn(2, 3, 5, 5), torch.randn(8, 3, 1, 1)  # 4x0.25 of 3 input channels
    with pytest.raises(ValueError, match=r"4x0\.25.*empty slice.* 3 channels"):
        sliced_conv2d(x, w, None, ["4x0.25"])
    # input_shared does not slice the inputs, so 3 image channels are fine there
    assert sliced_conv2d(x, w, None, ["4x0.25"], input_shared=True).shape == (2, 8, 5, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stride=0), r"stride must be an int >= 1"),
        (dict(stride=(1, 2, 3)), r"stride must be"),
        (dict(padding=-1), r"padding must be an int >= 0"),
        (dict(dilation=0), r"dilation must be an int >= 1"),
        (dict(dilation=3, padding=0), r"smaller than the kernel"),
    ],
)
def test_bad_geometry_raises(kwargs, message):
    x, w, b = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3), None
    with pytest.raises(ValueError, match=message):
        sliced_conv2d(x, w, b, ["2x0.5"], **kwargs)


def test_checks_run_once_per_call_signature(monkeypatch):
    """A repeated call reuses its checks and plan; a call differing in anything they read (shapes,
    geometry, dtypes, whether autocast reconciles them) is checked anew."""
    calls = []
    original = sliced_conv._check
    monkeypatch.setattr(sliced_conv, "_CHECKED", sliced_conv.checks.CheckedCalls())
    monkeypatch.setattr(sliced_conv, "_check", lambda *args: calls.append(1) or original(*args))
    x, w, b = _good()
    switches = SwitchSet.of(["2x0.5", "1x1.0"])
    first = sliced_conv2d(x, w, b, switches, padding=1)
    assert torch.equal(sliced_conv2d(x, w, b, switches, padding=1), first) and len(calls) == 1
    with pytest.raises(ValueError, match="smaller than the kernel"):
        sliced_conv2d(x, w, b, switches, dilation=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sliced_conv2d(x.bfloat16(), w, b, switches, padding=1).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="mixed dtypes"):  # the same call outside autocast
        sliced_conv2d(x.bfloat16(), w, b, switches, padding=1)
    # a 3x3 kernel on 1-pixel images is cut to its centre tap at every call, not only the first
    point = torch.randn(4, 6, 1, 1)
    for _ in range(2):
        torch.testing.assert_close(
            sliced_conv2d(point, w, b, switches, padding=1), sliced_conv2d(point, w[:, :, 1:2, 1:2], b, switches)
        )
    # lists are not hashable: checked at every call, and right
    assert torch.equal(sliced_conv2d(x, w, b, switches, padding=[1, 1]), first)
    assert torch.equal(sliced_conv2d(x, w, b, switches, padding=[1, 1]), first)
    assert len(calls) == 8


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_matches_eager(conv_backend):
    torch._dynamo.reset()
    switches = SwitchSet(["2x0.5", "0.3+0.7"])
    x, weight, bias = torch.randn(4, 7, 6, 6), torch.randn(5, 7, 3, 3), torch.randn(5)

    def f(x, weight, bias):
        return torch.relu(sliced_conv2d(x, weight, bias, switches, stride=1, padding=1)) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xs, ws = leaf(x), leaf(weight)
    y = compiled(xs, ws, bias)
    y.square().sum().backward()
    xe, we = leaf(x), leaf(weight)
    ye = f(xe, we, bias)
    ye.square().sum().backward()
    # compiled graphs record the paradis op whatever backend is forced (forced backends are eager):
    # against the reference backend, two float32 summation orders
    for got, want in ((y, ye), (xs.grad, xe.grad), (ws.grad, we.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- nn module
def test_sliced_conv2d_module(conv_backend):
    module = SlicedConv2d(7, 5, 3, ["2x0.5", "1x1.0", "1x0.5"], padding=1, bias=True)
    text = repr(module)
    assert "switches=[2x0.5, 1x1.0, 1x0.5]" in text and "kernel_size=(3, 3)" in text
    x = torch.randn(6, 7, 5, 5)
    y = module(x)
    expected = oracle(
        x.double(), module.weight.double(), module.bias.double(), ["2x0.5", "1x1.0", "1x0.5"], 1, 1, 1, False
    )
    torch.testing.assert_close(y, expected.float(), rtol=1e-4, atol=1e-4)
    module.set_active(["1x0.5", "2x0.5"])
    assert "switches=[1x0.5, 2x0.5]" in repr(module)
    y = module(x[:4])
    expected = oracle(x[:4].double(), module.weight.double(), module.bias.double(), ["1x0.5", "2x0.5"], 1, 1, 1, False)
    torch.testing.assert_close(y, expected.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="empty slice"):
        SlicedConv2d(3, 8, 1, ["4x0.25"])
