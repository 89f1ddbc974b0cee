"""Every op under torch.autocast, as F.conv2d and F.batch_norm behave there: the convolutions run
in the autocast dtype (gradients come back in the parameters' dtype), the BatchNorm takes a
low-precision x with float32 parameters and returns x's dtype.

The oracle runs in float64 on the values autocast computes with (inputs and the output gradient
rounded to the autocast dtype), so what remains is the op's float32 accumulation and one rounding
of each result: the tolerances are the dtype's epsilon, not a guess.
"""

from __future__ import annotations

import random

import pytest
import torch

import bn_oracle
import conv_oracle
from paradis_fast import SwitchSet
from paradis_fast.models import mobilenet_v1, resnet20, wdsr_a
from paradis_fast.ops import available_backends, depthwise_conv2d, sliced_conv2d, switch_batch_norm, use_backend
from paradis_fast.ops.plan import conv_blocks

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("sliced_conv2d"), reason="paradis_fast._C is not built: no paradis ops"
)

DTYPES = [torch.bfloat16, torch.float16]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
SWITCH_SETS = {
    "uniform": ["1x1.0", "2x0.5", "4x0.25"],
    "unequal": ["0.5+0.25+0.25", "1x1.0"],
    "narrow": ["4x0.25", "3x1/3"],
}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def rounded(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t as autocast computes with it, in float64."""
    return None if t is None else t.to(dtype).double()


def assert_close_in(dtype: torch.dtype, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Within one rounding to dtype of expected, plus float32 accumulation noise on its scale."""
    eps = torch.finfo(dtype).eps
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=2 * eps, atol=eps * scale, msg=what)


def conv_case(seed: int, switches: str, dtype: torch.dtype, layout: str):
    rng = random.Random(seed)
    kernel = rng.choice([1, 3])
    return dict(
        switches=SWITCH_SETS[switches],
        batch=rng.choice([1, 2, 3]),
        c_in=rng.choice([12, 13, 21]),
        c_out=rng.choice([12, 17, 24]),
        hw=(rng.randint(kernel, 9), rng.randint(kernel, 9)),
        kernel=kernel,
        stride=rng.choice([1, 2]),
        padding=rng.choice([0, kernel // 2]),
        dilation=1,
        bias=rng.random() < 0.5,
        input_shared=rng.random() < 0.25,  # a network's stem
        seed=seed,
        dtype=dtype,
        layout=LAYOUTS[layout],
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("switches", SWITCH_SETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "device, compute", [("cpu", "native"), ("cpu", "float32"), pytest.param("cuda", None, marks=NEEDS_CUDA)]
)
def test_sliced_conv2d_under_autocast_matches_the_oracle(monkeypatch, device, compute, seed, dtype, switches, layout):
    """Both ways the CPU kernel computes a low dtype: in it (where the CPU has its units) and in
    float32 (elsewhere), forced here on any CPU; on CUDA the Triton kernel's tensor cores."""
    if compute:
        monkeypatch.setenv("PARADIS_CPU_LOW_PRECISION", compute)
    case = conv_case(seed * 7 + len(switches), switches, dtype, layout)
    x, weight, bias, g = conv_oracle.make_inputs(case, torch.float32)
    x, weight, bias = (None if t is None else t.to(device) for t in (x, weight, bias))
    x = x.contiguous(memory_format=case["layout"]).requires_grad_()
    weight.requires_grad_()
    if bias is not None:
        bias.requires_grad_()
    stride, padding, dilation, shared = conv_oracle.conv_args(case)
    with torch.autocast(device, dtype=dtype):
        y = sliced_conv2d(x, weight, bias, case["switches"], stride, padding, dilation, shared)
    assert y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y.to(device, dtype))
    assert x.grad.dtype == weight.grad.dtype == torch.float32

    xr, wr, br = (conv_oracle.leaf(rounded(t, dtype)) for t in (x.detach().cpu(), weight.detach().cpu(), bias))
    yr = conv_oracle.oracle(xr, wr, br, case["switches"], stride, padding, dilation, shared)
    yr.backward(rounded(grad_y, dtype))
    assert_close_in(dtype, y, yr.detach(), "y")
    assert_close_in(dtype, x.grad, xr.grad, "grad x")
    assert_close_in(dtype, weight.grad, wr.grad, "grad weight")
    if bias is not None:
        assert bias.grad.dtype == torch.float32
        assert_close_in(dtype, bias.grad, br.grad, "grad bias")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [None, "same", "float32"])
@pytest.mark.parametrize("switches", SWITCH_SETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_switch_batch_norm_under_autocast_computes_in_float32_and_returns_x_dtype(
    device, dtype, switches, residual, layout
):
    """x in the autocast dtype (a convolution's output), float32 parameters and statistics; a
    float32 residual promotes the sum to float32, like torch.add."""
    names = SWITCH_SETS[switches]
    case = dict(switches=names, batch=3, channels=13, spatial=(3, 4), num_rows=len(names), dtype=torch.float32, seed=5)
    (x, weight, bias, running_mean, running_var), g = bn_oracle.make_inputs(case)
    x = x.to(device, dtype).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    weight, bias = (t.to(device).requires_grad_() for t in (weight, bias))
    res = None
    if residual is not None:
        res = torch.randn(x.shape, generator=g).to(device, dtype if residual == "same" else torch.float32)
        res.requires_grad_()
    stats = running_mean.to(device, copy=True), running_var.to(device, copy=True)
    with torch.autocast(device, dtype=dtype):
        y = switch_batch_norm(x, weight, bias, *stats, names, training=True, activation="relu", residual=res)
    assert y.dtype == (torch.float32 if residual == "float32" else dtype)
    assert stats[0].dtype == torch.float32 and not torch.equal(stats[0].cpu(), running_mean), "statistics not updated"
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    y.backward(grad_y.to(device))
    assert x.grad.dtype == dtype and weight.grad.dtype == bias.grad.dtype == torch.float32

    leaves = [bn_oracle.leaf(t.cpu(), torch.float64) for t in (x, weight, bias)]
    res_r = None if res is None else bn_oracle.leaf(res.cpu(), torch.float64)
    yr, _ = bn_oracle.oracle(
        *leaves, running_mean, running_var, names, True, bn_oracle.EPS, "relu", list(range(len(names))), res_r
    )
    yr.backward(grad_y.double())
    assert_close_in(y.dtype, y, yr.detach(), "y")
    for name, actual, leaf in zip(["x", "weight", "bias"], [x.grad, weight.grad, bias.grad], leaves):
        assert_close_in(dtype, actual, leaf.grad, f"grad {name}")
    if res is not None:
        assert res.grad.dtype == res.dtype
        assert_close_in(y.dtype, res.grad, res_r.grad, "grad residual")


@pytest.mark.parametrize("hw", [5, 20], ids=["small-image-op", "large-image-aten"])
def test_depthwise_conv2d_under_autocast_runs_in_the_autocast_dtype(hw):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 10, hw, hw, generator=g, requires_grad=True)
    weight = torch.randn(10, 1, 3, 3, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv2d(x, weight, None, 1, 1)
    assert y.dtype == torch.bfloat16
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad_y.to(y.dtype))
    xr, wr = (conv_oracle.leaf(rounded(t.detach(), torch.bfloat16)) for t in (x, weight))
    yr = torch.nn.functional.conv2d(xr, wr, None, 1, 1, 1, 10)
    yr.backward(rounded(grad_y, torch.bfloat16))
    assert x.grad.dtype == weight.grad.dtype == torch.float32
    for actual, expected in [(y, yr.detach()), (x.grad, xr.grad), (weight.grad, wr.grad)]:
        assert_close_in(torch.bfloat16, actual, expected, "depthwise")


def test_autocast_leaves_float64_and_mixed_dtypes_outside_autocast_are_errors():
    x, weight = torch.randn(4, 6, 5, 5, dtype=torch.float64), torch.randn(6, 6, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sliced_conv2d(x, weight, None, ["2x0.5"], padding=1).dtype == torch.float64
        with pytest.raises(TypeError, match="mixed dtypes"):
            sliced_conv2d(x.float(), weight, None, ["2x0.5"], padding=1)
    with pytest.raises(TypeError, match="mixed dtypes"):
        sliced_conv2d(x.bfloat16(), weight.float(), None, ["2x0.5"], padding=1)


def test_pure_low_precision_models_still_run_without_autocast():
    model = mobilenet_v1(5, ["1x1.0", "2x0.5"], width_mult=0.25, small_input=True).bfloat16()
    y = model(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("op", ["sliced_conv2d", "switch_batch_norm"])
def test_opcheck_under_autocast(op):
    g = torch.Generator().manual_seed(22)
    switches = SWITCH_SETS["unequal"]
    if op == "sliced_conv2d":
        blocks = list(conv_blocks(SwitchSet(switches), 5, 6, False))
        args = (torch.randn(4, 5, 4, 4, generator=g, requires_grad=True), torch.randn(6, 5, 3, 3, generator=g),
                None, blocks, 2, [1, 1], [1, 1], [1, 1], False)  # fmt: skip
    else:
        args = (torch.randn(4, 6, 3, 3, generator=g).bfloat16().requires_grad_(), torch.randn(2, 6, generator=g),
                torch.randn(2, 6, generator=g), torch.zeros(2, 6), torch.ones(2, 6), [3, 6], [0, 1], True, 1e-5,
                "relu", torch.randn(4, 6, 3, 3, generator=g, requires_grad=True))  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.library.opcheck(getattr(torch.ops.paradis, op).default, args)


MODELS = {
    "mobilenet_v1": lambda sw: mobilenet_v1(5, sw, width_mult=0.25, small_input=True),
    "resnet20": lambda sw: resnet20(5, sw, width_mult=0.5),
    "wdsr_a": lambda sw: wdsr_a(2, sw, n_feats=8, block_feats=16, n_blocks=2, res_scale=0.5),
}


def loss_and_grads(model, images, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(images)
    loss = y.float().square().mean()
    loss.backward()
    return y, loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("name, training", [("mobilenet_v1", False), ("resnet20", True), ("wdsr_a", True)])
def test_whole_model_under_autocast_is_close_to_float32(name, training):
    """MobileNet in eval mode: at random init its BatchNorms over a few values per channel turn
    bfloat16's rounding into a different function in training mode (a plain dense MobileNet under
    autocast lands as far, about 40% off its float32 output)."""
    torch.manual_seed(23)
    model = MODELS[name](SWITCH_SETS["uniform"]).train(training)
    images = torch.randn(4, 3, 16, 16)
    y32, loss32, grads32 = loss_and_grads(model, images, autocast=False)
    y16, loss16, grads16 = loss_and_grads(model, images, autocast=True)
    assert y16.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert (y16.float() - y32).norm() < 0.03 * y32.norm()
    assert torch.allclose(loss16, loss32, rtol=0.03)
    cosine = torch.nn.functional.cosine_similarity(grads16 / grads16.norm(), grads32 / grads32.norm(), dim=0)
    assert cosine > 0.999


def test_compiled_fullgraph_under_autocast_matches_eager():
    torch.manual_seed(24)
    model = MODELS["resnet20"](SWITCH_SETS["unequal"])
    images = torch.randn(2, 3, 16, 16)

    def step(images):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images)

    eager = step(images)
    compiled = torch.compile(step, fullgraph=True)(images)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0.02)


def test_baseline_isa_under_autocast_matches_native(monkeypatch):
    case = conv_case(3, "uniform", torch.bfloat16, "nhwc")
    x, weight, bias, _ = conv_oracle.make_inputs(case, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
            return sliced_conv2d(x, weight, bias, case["switches"], case["stride"], case["padding"])

    native = run()
    monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")
    torch.testing.assert_close(run(), native, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-2)


@pytest.mark.parametrize("compute, casts", [("native", 0), ("float32", 3)])
def test_low_precision_path_is_the_one_chosen(monkeypatch, compute, casts):
    """native: the convolutions get bfloat16 tensors; float32: x and the weight cast up, y down."""
    monkeypatch.setenv("PARADIS_CPU_LOW_PRECISION", compute)
    x, weight = torch.randn(4, 6, 5, 5).bfloat16(), torch.randn(6, 6, 3, 3).bfloat16()
    blocks = list(conv_blocks(SwitchSet(["2x0.5"]), 6, 6, False))
    with torch.profiler.profile() as prof:
        torch.ops.paradis.sliced_conv2d(x, weight, None, blocks, 1, [1, 1], [1, 1], [1, 1], False)
    assert [e.name for e in prof.events()].count("aten::_to_copy") == casts


def test_a_bad_low_precision_setting_is_named(monkeypatch):
    monkeypatch.setenv("PARADIS_CPU_LOW_PRECISION", "fast")
    x, weight = torch.randn(2, 4, 3, 3).bfloat16(), torch.randn(4, 4, 1, 1).bfloat16()
    with pytest.raises(RuntimeError, match="PARADIS_CPU_LOW_PRECISION must be native or float32, got fast"):
        sliced_conv2d(x, weight, None, ["1x1.0"])
