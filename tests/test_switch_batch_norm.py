"""paradis::switch_batch_norm against an independent float64 oracle (DESIGN §3), on every backend,
and the SwitchBatchNorm2d module.

Oracle: per switch s and covered channel c, mean and biased variance over (batch rows of s, H, W)
computed directly, normalised, affine with parameter row rows[s], then the activation; eval mode
uses the running statistics of row rows[s]. Gradients come from autograd.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from paradis_fast import SwitchSet
from paradis_fast.nn import SwitchBatchNorm2d
from paradis_fast.ops import library, switch_batch_norm, switch_bn, use_backend
from paradis_fast.ops.plan import covered_channels

from conftest import BN_BACKENDS, BN_CASES

from bn_oracle import EPS, TOLERANCE, check_zeros_outside, leaf, make_inputs, oracle


CHANNELS_LAST_BACKENDS = ("cpu", "reference")


def channels_last_case(case):
    """The case with a 4-D x whose channels_last layout differs from NCHW (H*W > 1)."""
    spatial = case["spatial"]
    return dict(case, spatial=spatial if len(spatial) == 2 and math.prod(spatial) > 1 else (3, 2))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_oracle(bn_case, bn_backend, layout):
    if layout == "channels_last" and bn_backend not in CHANNELS_LAST_BACKENDS:
        pytest.skip(f"channels_last matrix runs on {CHANNELS_LAST_BACKENDS}")
    check_against_oracle(bn_case, layout)


@pytest.mark.skipif("cpu" not in BN_BACKENDS, reason="the C++ extension is not built")
def test_cpu_baseline_kernels_match_oracle(monkeypatch):
    """The C++ kernels built for baseline x86-64, which CPUs without AVX2 + FMA run, on half the matrix."""
    monkeypatch.setenv("PARADIS_CPU_ISA", "baseline")
    with use_backend("cpu"):
        for case in BN_CASES[::2]:
            for layout in ("nchw", "channels_last"):
                check_against_oracle(case, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_residual_matches_oracle(bn_case, bn_backend, layout):
    """activation(BatchNorm(x) + residual): fused in the cpu kernel, added by the op elsewhere."""
    if layout == "channels_last" and bn_backend not in CHANNELS_LAST_BACKENDS:
        pytest.skip(f"channels_last matrix runs on {CHANNELS_LAST_BACKENDS}")
    check_against_oracle(bn_case, layout, with_residual=True)


def check_against_oracle(case, layout, with_residual=False):
    if layout == "channels_last":
        case = channels_last_case(case)
    dtype, switches, training, activation = case["dtype"], case["switches"], case["training"], case["activation"]
    (x, weight, bias, running_mean, running_var), g = make_inputs(case)
    rng = random.Random(case["seed"])
    momentum = rng.choice((0.1, 0.3))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    rows = case["rows"] if case["rows"] is not None else list(range(len(switches)))
    before_mean, before_var = running_mean.clone(), running_var.clone()

    # the residual (2-D cases included) in either layout: the op gives it x's
    residual = (torch.randn(x.shape, generator=g, dtype=torch.float64) * 2).to(dtype) if with_residual else None
    if residual is not None and x.dim() == 4:
        residual = residual.contiguous(memory_format=rng.choice((torch.contiguous_format, torch.channels_last)))

    xo, wo, bo = leaf(x), leaf(weight), leaf(bias)
    ro = leaf(residual) if with_residual else None
    y = switch_batch_norm(
        xo,
        wo,
        bo,
        running_mean,
        running_var,
        switches,
        training,
        momentum,
        EPS,
        activation,
        rows=case["rows"],
        residual=ro,
    )
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64)
    # grad_y may arrive in either layout; the op's grad_x follows x's
    grad_y_fmt = rng.choice((torch.contiguous_format, torch.channels_last)) if layout == "channels_last" else fmt
    inputs = (xo, wo, bo, ro) if with_residual else (xo, wo, bo)
    grads = torch.autograd.grad(y, inputs, grad_y.to(dtype).contiguous(memory_format=grad_y_fmt))
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt), "layout not kept"
    xo.grad, wo.grad, bo.grad = grads[:3]

    f64 = torch.float64
    xr, wr, br = leaf(x, f64), leaf(weight, f64), leaf(bias, f64)
    rr = leaf(residual, f64) if with_residual else None
    yr, stats = oracle(
        xr, wr, br, before_mean.to(f64), before_var.to(f64), switches, training, EPS, activation, rows, rr
    )
    yr.backward(grad_y)

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.detach(), yr.detach().to(dtype), **tol, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(xo.grad, xr.grad.to(dtype), **tol, msg=lambda m: f"grad x: {m}")
    torch.testing.assert_close(wo.grad, wr.grad.to(dtype), **tol, msg=lambda m: f"grad weight: {m}")
    torch.testing.assert_close(bo.grad, br.grad.to(dtype), **tol, msg=lambda m: f"grad bias: {m}")
    if with_residual:
        torch.testing.assert_close(grads[3], rr.grad.to(dtype), **tol, msg=lambda m: f"grad residual: {m}")
    check_zeros_outside(
        switches, rows, case["num_rows"], case["channels"], None if with_residual else y, xo.grad, wo.grad, bo.grad
    )

    # running statistics
    if not training:
        assert torch.equal(running_mean, before_mean) and torch.equal(running_var, before_var), "eval changed stats"
        return
    touched = torch.zeros_like(running_mean, dtype=torch.bool)
    for c, r, mean, var, count in stats:
        touched[r, :c] = True
        expected_mean = (1 - momentum) * before_mean[r, :c].to(f64) + momentum * mean
        expected_var = (1 - momentum) * before_var[r, :c].to(f64) + momentum * var * count / (count - 1)
        torch.testing.assert_close(
            running_mean[r, :c], expected_mean.to(dtype), **tol, msg=lambda m: f"running_mean: {m}"
        )
        torch.testing.assert_close(running_var[r, :c], expected_var.to(dtype), **tol, msg=lambda m: f"running_var: {m}")
    assert torch.equal(running_mean[~touched], before_mean[~touched]), "uncovered/unused running_mean changed"
    assert torch.equal(running_var[~touched], before_var[~touched]), "uncovered/unused running_var changed"


def test_relu6_saturates_and_passes_no_gradient_there(bn_backend):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 7, 3, 3, generator=g, dtype=torch.float64)
    weight = torch.full((2, 7), 5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.full((2, 7), 2.0, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(2, 7, dtype=torch.float64), torch.ones(2, 7, dtype=torch.float64)
    x.requires_grad_()
    y = switch_batch_norm(x, weight, bias, rm, rv, ["2x0.5", "1x0.5"], True, activation="relu6")
    assert (y == 6).any() and (y == 0).any() and ((y > 0) & (y < 6)).any()
    y.backward(torch.ones_like(y))
    xr, wr, br = leaf(x), leaf(weight), leaf(bias)
    yr, _ = oracle(xr, wr, br, rm, rv, ["2x0.5", "1x0.5"], True, EPS, "relu6", [0, 1])
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weight.grad, wr.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("x_dtype, tol", [(torch.float64, 1e-5), (torch.bfloat16, 5e-2)], ids=["f64", "bf16"])
def test_float32_parameters_with_other_input_dtype(bn_backend, x_dtype, tol):
    g = torch.Generator().manual_seed(9)
    switches = ["2x0.5", "0.3+0.7"]
    x = torch.randn(4, 7, 3, 3, generator=g).to(x_dtype)
    weight, bias = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    rm, rv = torch.randn(2, 7, generator=g), torch.rand(2, 7, generator=g) + 0.5
    before = rm.clone()
    xo, wo, bo = leaf(x), leaf(weight), leaf(bias)
    y = switch_batch_norm(xo, wo, bo, rm, rv, switches, True, activation="relu")
    assert y.dtype == x_dtype and rm.dtype == torch.float32
    y.float().square().sum().backward()
    assert xo.grad.dtype == x_dtype and wo.grad.dtype == torch.float32
    f64 = torch.float64
    xr, wr, br = leaf(x, f64), leaf(weight, f64), leaf(bias, f64)
    yr, _ = oracle(xr, wr, br, before.double(), rv.double(), switches, True, EPS, "relu", [0, 1])
    yr.square().sum().backward()
    torch.testing.assert_close(y.double(), yr.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(wo.grad.double(), wr.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(bo.grad.double(), br.grad, rtol=tol, atol=tol * 10)
    assert not torch.equal(rm, before)


# ------------------------------------------------------------------------ running statistics
@pytest.fixture(params=["kernel", "tensor-ops"])
def stats_update(request, monkeypatch):
    """Each way the running statistics update: the library's kernel of the device (where it has
    one) and the tensor ops every other device runs."""
    if request.param == "tensor-ops":
        monkeypatch.setattr(switch_bn, "update_running_stats", switch_bn.update_running_stats_with_tensor_ops)
    elif not library.has_kernel(switch_bn.UPDATE, "cpu"):
        pytest.skip(f"no CPU kernel for paradis::{switch_bn.UPDATE}: {library.load_error()}")
    return request.param


@pytest.mark.parametrize("rows", [[3, 1], [0, 1]], ids=["any-rows", "leading-rows"])
def test_running_stats_rows_subset(bn_backend, stats_update, rows):
    """Two of five parameter rows run (rows=[3, 1], or the leading [0, 1], updated as whole rows with
    a weight of 0 on the uncovered channels); the other rows and uncovered channels stay bit-identical."""
    g = torch.Generator().manual_seed(10)
    channels, switches = 13, ["1x0.5", "0.5+0.25+0.25"]
    x = torch.randn(2 * 3, channels, 4, 4, generator=g)
    weight, bias = torch.randn(5, channels, generator=g), torch.randn(5, channels, generator=g)
    rm, rv = torch.randn(5, channels, generator=g), torch.rand(5, channels, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    switch_batch_norm(x, weight, bias, rm, rv, switches, True, 0.25, rows=rows)
    for s, (r, c) in enumerate(zip(rows, (7, 13))):
        xs = x[s * 3 : (s + 1) * 3, :c].double()
        mean = xs.mean((0, 2, 3))
        var = xs.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(rm[r, :c].double(), 0.75 * rm0[r, :c].double() + 0.25 * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv[r, :c].double(), 0.75 * rv0[r, :c].double() + 0.25 * var, rtol=1e-5, atol=1e-6)
    assert torch.equal(rm[rows[0], 7:], rm0[rows[0], 7:]) and torch.equal(rv[rows[0], 7:], rv0[rows[0], 7:])
    for r in set(range(5)) - set(rows):
        assert torch.equal(rm[r], rm0[r]) and torch.equal(rv[r], rv0[r]), f"unused row {r} changed"
    assert not torch.equal(rm[1], rm0[1]) and not torch.equal(rv[rows[0], :7], rv0[rows[0], :7])


def test_eval_leaves_running_stats_untouched(bn_backend):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 7, 3, 3, generator=g)
    weight, bias = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    rm, rv = torch.randn(2, 7, generator=g), torch.rand(2, 7, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = switch_batch_norm(x, weight, bias, rm, rv, ["2x0.5", "1x1.0"], False, 0.9)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    # eval uses the running statistics: x = running_mean gives exactly the bias
    x2 = torch.cat([rm[0].expand(2, 7), rm[1].expand(2, 7)])[:, :, None, None].expand(4, 7, 3, 3).contiguous()
    y2 = switch_batch_norm(x2, weight, bias, rm, rv, ["2x0.5", "1x1.0"], False)
    torch.testing.assert_close(y2[:2, :, 0, 0], bias[0].expand(2, 7), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y2[2:, :, 0, 0], bias[1].expand(2, 7), rtol=1e-6, atol=1e-6)
    assert not torch.equal(y, y2)


def test_momentum_per_switch_tensor(bn_backend, stats_update):
    g = torch.Generator().manual_seed(12)
    switches, channels = ["2x0.5", "1x1.0", "1x0.5"], 7
    x = torch.randn(3 * 2, channels, 3, 3, generator=g)
    weight, bias = torch.randn(3, channels, generator=g), torch.randn(3, channels, generator=g)
    rm, rv = torch.randn(3, channels, generator=g), torch.rand(3, channels, generator=g) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    momentum = torch.tensor([0.1, 0.5, 1.0])
    switch_batch_norm(x, weight, bias, rm, rv, switches, True, momentum)
    for s, (m, c) in enumerate(zip(momentum.tolist(), (7, 7, 4))):
        xs = x[2 * s : 2 * s + 2, :c].double()
        mean, var = xs.mean((0, 2, 3)), xs.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(rm[s, :c].double(), (1 - m) * rm0[s, :c].double() + m * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv[s, :c].double(), (1 - m) * rv0[s, :c].double() + m * var, rtol=1e-5, atol=1e-6)
        assert torch.equal(rm[s, c:], rm0[s, c:]) and torch.equal(rv[s, c:], rv0[s, c:])


@pytest.mark.parametrize("seed", range(6))
def test_update_kernel_matches_tensor_ops(seed):
    """paradis::update_running_stats_ against the tensor ops, on random row maps, coverage (narrow
    and unequal switch sets), momenta (one, or one per switch) and table dtypes."""
    if not library.has_kernel(switch_bn.UPDATE, "cpu"):
        pytest.skip("the CPU kernels are not built")
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    channels, total_rows = rng.randint(1, 40), rng.randint(1, 6)
    num_switches = rng.randint(1, total_rows)
    rows = rng.sample(range(total_rows), num_switches) if seed % 2 else list(range(num_switches))
    covered = [rng.randint(1, channels) for _ in range(num_switches)]
    dtype = (torch.float32, torch.float64, torch.bfloat16)[seed % 3]
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mean = torch.randn(num_switches, channels, generator=g, dtype=stats_dtype)
    var = torch.rand(num_switches, channels, generator=g, dtype=stats_dtype) + 0.1
    for s, c in enumerate(covered):  # the kernels' statistics are zero where a switch does not read
        mean[s, c:] = var[s, c:] = 0
    momentum = torch.rand(num_switches, generator=g) if seed % 3 == 1 else rng.uniform(0.05, 0.9)
    tables = [torch.randn(total_rows, channels, generator=g).to(dtype), torch.rand(total_rows, channels, generator=g)]
    tables[1] = (tables[1] + 0.5).to(dtype)
    count = rng.randint(2, 50)
    original = [t.clone() for t in tables]
    expected = [t.clone() for t in tables]
    switch_bn.update_running_stats_with_tensor_ops(*expected, mean, var, covered, rows, count, momentum)
    switch_bn.update_running_stats(*tables, mean, var, covered, rows, count, momentum)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    read = torch.zeros(total_rows, channels, dtype=torch.bool)
    for r, c in zip(rows, covered):
        read[r, :c] = True
    for got, want, before in zip(tables, expected, original):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert torch.equal(got[~read], before[~read]), "an entry no switch reads changed"
        assert not torch.equal(got[read], before[read])


def test_update_kernel_rejects_bad_tables():
    if not library.has_kernel(switch_bn.UPDATE, "cpu"):
        pytest.skip("the CPU kernels are not built")
    update = library.op(switch_bn.UPDATE)
    rm, rv, mean, var = torch.zeros(3, 5), torch.ones(3, 5), torch.zeros(2, 5), torch.ones(2, 5)
    with pytest.raises(RuntimeError, match=r"covers 6 channels of row 1, outside the \[3, 5\] tables"):
        update(rm, rv, mean, var, [5, 6], [0, 1], 4, 0.1, None)
    with pytest.raises(RuntimeError, match=r"covers 5 channels of row 3"):
        update(rm, rv, mean, var, [5, 5], [0, 3], 4, 0.1, None)
    with pytest.raises(RuntimeError, match="momentum_per_switch must hold 2 values"):
        update(rm, rv, mean, var, [5, 5], [0, 1], 4, 0.1, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"mean must have shape \[2, 5\]"):
        update(rm, rv, mean[:1], var, [5, 5], [0, 1], 4, 0.1, None)
    with pytest.raises(RuntimeError, match="tables of one dtype"):
        update(rm, rv.double(), mean, var, [5, 5], [0, 1], 4, 0.1, None)
    torch.library.opcheck(update, (rm, rv, mean + 1, var, [5, 3], [2, 0], 4, 0.1, torch.tensor([0.2, 0.7])))


# -------------------------------------------------------------------------- autograd machinery
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_opcheck(bn_backend, training, activation):
    g = torch.Generator().manual_seed(13)
    switches = SwitchSet(["2x0.5", "0.3+0.7"])
    x = torch.randn(4, 7, 3, 3, generator=g, requires_grad=True)
    weight = (torch.randn(3, 7, generator=g) * 3).requires_grad_()
    bias = torch.randn(3, 7, generator=g).requires_grad_()
    rm, rv = torch.randn(3, 7, generator=g), torch.rand(3, 7, generator=g) + 0.5
    args = (x, weight, bias, rm, rv, list(covered_channels(switches, 7)), [2, 0], training, EPS, activation or "none")
    torch.library.opcheck(torch.ops.paradis.switch_batch_norm.default, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_opcheck_with_residual(bn_backend, training, activation):
    g = torch.Generator().manual_seed(19)
    switches = SwitchSet(["2x0.5", "1x0.5"])
    x = torch.randn(4, 7, 3, 3, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    residual = (torch.randn(4, 7, 3, 3, generator=g) * 3).requires_grad_()
    weight = (torch.randn(3, 7, generator=g) * 3).requires_grad_()
    bias = torch.randn(3, 7, generator=g).requires_grad_()
    rm, rv = torch.randn(3, 7, generator=g), torch.rand(3, 7, generator=g) + 0.5
    args = (
        x,
        weight,
        bias,
        rm,
        rv,
        list(covered_channels(switches, 7)),
        [2, 0],
        training,
        EPS,
        activation or "none",
        residual,
    )
    torch.library.opcheck(torch.ops.paradis.switch_batch_norm.default, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_channels_last(bn_backend, training):
    g = torch.Generator().manual_seed(17)
    switches = SwitchSet(["2x0.5", "0.5+0.25+0.25"])
    x = torch.randn(4, 9, 3, 2, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(3, 9, generator=g) * 3).requires_grad_()
    bias = torch.randn(3, 9, generator=g).requires_grad_()
    rm, rv = torch.randn(3, 9, generator=g), torch.rand(3, 9, generator=g) + 0.5
    args = (x, weight, bias, rm, rv, list(covered_channels(switches, 9)), [2, 0], training, EPS, "relu")
    torch.library.opcheck(torch.ops.paradis.switch_batch_norm.default, args)
    y, _, _ = torch.ops.paradis.switch_batch_norm(*args)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.skipif("cpu" not in BN_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_channels_last_is_deterministic_and_matches_nchw(dtype):
    """Several row chunks per switch: bit-identical across runs and thread counts, close to NCHW."""
    g = torch.Generator().manual_seed(18)
    switches, channels = ["1x1.0", "0.5+0.25+0.25"], 11
    x = (torch.randn(2 * 2, channels, 48, 40, generator=g) * 3 + 1).to(dtype)
    grad_y = torch.randn(x.shape, generator=g).to(dtype)
    weight, bias = torch.randn(2, channels, generator=g), torch.randn(2, channels, generator=g)
    rm, rv = torch.zeros(2, channels), torch.ones(2, channels)

    def run(fmt, threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            xo, wo, bo = leaf(x.contiguous(memory_format=fmt)), leaf(weight), leaf(bias)
            with use_backend("cpu"):
                y = switch_batch_norm(xo, wo, bo, rm.clone(), rv.clone(), switches, True, activation="relu6")
                return (y, *torch.autograd.grad(y, (xo, wo, bo), grad_y))
        finally:
            torch.set_num_threads(previous)

    first = run(torch.channels_last, 2)
    for other in (run(torch.channels_last, 2), run(torch.channels_last, 1)):
        assert all(torch.equal(a, b) for a, b in zip(first, other)), "channels_last results vary between runs"
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for a, b in zip(first, run(torch.contiguous_format, 2)):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.skipif("cpu" not in BN_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spatial, batch", [((5, 5), 45), ((15, 16), 9), ((3, 1), 400)], ids=["5x5", "15x16", "3x1"])
def test_cpu_nchw_small_images_in_image_order_match_oracle(dtype, spatial, batch):
    """NCHW rows of fewer than 256 values run on the image-order kernels: chunks of a switch's
    images (2-3 per switch here), each image's channel rows in turn, partial results merged in
    chunk order; statistics, y and every gradient against the float64 oracle."""
    case = dict(
        seed=31,
        dtype=dtype,
        training=True,
        activation="relu",
        channels=40,
        switches=["1x1.0", "0.5+0.25+0.25", "3x1/3"],
        batch=batch,
        spatial=spatial,
        num_rows=3,
        rows=None,
    )
    with use_backend("cpu"):
        check_against_oracle(case, "nchw")


@pytest.mark.skipif("cpu" not in BN_BACKENDS, reason="the C++ extension is not built")
def test_cpu_nchw_image_order_in_bfloat16_matches_channels_last():
    """The image-order kernels on bfloat16 rows (converted to float32 row by row) give what the
    channels_last kernels give."""
    g = torch.Generator().manual_seed(19)
    switches, channels = ["1x1.0", "2x0.5"], 9
    x = (torch.randn(2 * 200, channels, 5, 5, generator=g) * 3 + 1).bfloat16()
    grad_y = torch.randn(x.shape, generator=g).bfloat16()
    weight, bias = torch.randn(2, channels, generator=g), torch.randn(2, channels, generator=g)

    def run(fmt):
        xo, wo, bo = leaf(x.contiguous(memory_format=fmt)), leaf(weight), leaf(bias)
        rm, rv = torch.zeros(2, channels), torch.ones(2, channels)
        with use_backend("cpu"):
            y = switch_batch_norm(xo, wo, bo, rm, rv, switches, True, activation="relu")
            return (y, *torch.autograd.grad(y, (xo, wo, bo), grad_y), rm, rv)

    for a, b in zip(run(torch.contiguous_format), run(torch.channels_last)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.skipif("cpu" not in BN_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_cpu_kernels_write_every_uncovered_channel(fmt):
    """y and grad_x are zero on the channels a switch does not read, a switch covering none too
    (the NHWC kernels write them row by row, into memory that held NaNs just before)."""
    g = torch.Generator().manual_seed(19)
    channels, covered, rows = 9, [9, 4, 0], [0, 1, 2]
    x = torch.randn(3 * 5, channels, 6, 7, generator=g).contiguous(memory_format=fmt)
    grad_y = torch.randn(x.shape, generator=g).contiguous(memory_format=fmt)
    params = [torch.randn(3, channels, generator=g) for _ in range(2)] + [torch.zeros(3, channels), torch.ones(3, 9)]
    forward, backward = torch.ops.paradis.switch_batch_norm, torch.ops.paradis.switch_batch_norm_backward
    poison = torch.full_like(x, float("nan"))
    del poison  # the allocator hands its memory to the next tensor of that size
    y, mean, var = forward(x, *params, covered, rows, True, EPS, "relu", None)
    poison = torch.full_like(x, float("nan"))
    del poison
    grad_x, _, _ = backward(grad_y, x, *params[:2], mean, var, covered, rows, True, EPS, "relu")
    for out in (y, grad_x):
        assert out.is_contiguous(memory_format=fmt)
        for s, c in enumerate(covered):
            assert torch.equal(out[5 * s : 5 * s + 5, c:], torch.zeros_like(out[5 * s : 5 * s + 5, c:]))
        assert out[:5].abs().sum() > 0 and out[5:10, :4].abs().sum() > 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck(bn_backend, training, activation):
    g = torch.Generator().manual_seed(14)
    f64 = torch.float64
    x = torch.randn(4, 5, 2, 2, generator=g, dtype=f64).requires_grad_()
    weight = torch.randn(3, 5, generator=g, dtype=f64).requires_grad_()
    bias = torch.randn(3, 5, generator=g, dtype=f64).requires_grad_()
    rm, rv = torch.randn(3, 5, generator=g, dtype=f64), torch.rand(3, 5, generator=g, dtype=f64) + 0.5

    def f(x, weight, bias):
        return switch_batch_norm(
            x, weight, bias, rm, rv, ["2x0.5", "1x0.5"], training, activation=activation, rows=[1, 2]
        )

    assert torch.autograd.gradcheck(f, (x, weight, bias))


# ---------------------------------------------------------------------------------- bad inputs
def _good(channels=7, rows=2):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(4, channels, 3, 3, generator=g)
    weight, bias = torch.randn(rows, channels, generator=g), torch.randn(rows, channels, generator=g)
    return x, weight, bias, torch.randn(rows, channels, generator=g), torch.rand(rows, channels, generator=g) + 0.5


def _swap(index, value):
    def mutate(args):
        args = list(args)
        args[index] = value(args[index]) if callable(value) else value
        return args

    return mutate


BAD = [
    ("one-param-row", lambda a: [a[0]] + [t[:1] for t in a[1:]], {}, ValueError, r"1 switch rows.*2 switches"),
    ("bias-rows", _swap(2, lambda b: torch.cat([b, b])), {}, ValueError, r"bias has 4 switch rows, weight has 2"),
    ("running-var-rows", _swap(4, lambda v: v[:1]), {}, ValueError, r"running_var has 1 switch rows"),
    ("channels", _swap(1, lambda w: torch.cat([w, w[:, :1]], 1)), {}, ValueError, r"weight has 8 channels, x has 7"),
    ("channels-x", _swap(0, lambda x: x[:, :6]), {}, ValueError, r"channel mismatch"),
    ("x-1d", _swap(0, lambda x: x.flatten()), {}, ValueError, r"x must be \[S\*B, C, \.\.\.\]"),
    ("weight-1d", _swap(1, lambda w: w[0]), {}, ValueError, r"weight must be \[S, C\]"),
    ("weight-3d", _swap(1, lambda w: w[None]), {}, ValueError, r"weight must be \[S, C\]"),
    ("dtype-params", _swap(1, lambda w: w.double()), {}, TypeError, r"mixed dtypes"),
    ("dtype-x-params", lambda a: [a[0].half()] + [t.double() for t in a[1:]], {}, TypeError, r"mixed dtypes"),
    ("non-tensor", _swap(2, lambda b: b.tolist()), {}, TypeError, r"bias must be a torch.Tensor"),
    ("int", _swap(0, lambda x: x.int()), {}, TypeError, r"floating"),
    ("meta-x", _swap(0, lambda x: x.to("meta")), {}, ValueError, r"mixed devices"),
    ("meta-stats", _swap(3, lambda m: m.to("meta")), {}, ValueError, r"mixed devices.*running_mean on meta"),
    ("rows-not-divisible", _swap(0, lambda x: x[:3]), {}, ValueError, r"3 rows, not a multiple of the 2 switches"),
    ("empty-set", lambda a: a, dict(switches=[]), ValueError, r"empty switch set"),
    ("none-set", lambda a: a, dict(switches=None), ValueError, r"empty switch set"),
    ("spelling", lambda a: a, dict(switches=["2x0.5", "abc"]), ValueError, r"bad switch spec 'abc'"),
    (
        "empty-slice",
        lambda a: [a[0][:, :3]] + [t[:, :3] for t in a[1:]],
        dict(switches=["4x0.25", "1x1.0"]),
        ValueError,
        r"4x0\.25.*empty slice.* 3 channels",
    ),
    ("activation", lambda a: a, dict(activation="gelu"), ValueError, r"unknown activation 'gelu'"),
    ("rows-duplicate", lambda a: a, dict(rows=[0, 0]), ValueError, r"rows \[0, 0\]"),
    ("rows-out-of-range", lambda a: a, dict(rows=[0, 2]), ValueError, r"rows \[0, 2\]"),
    ("rows-count", lambda a: a, dict(rows=[0]), ValueError, r"rows \[0\]"),
    (
        "one-value",
        _swap(0, lambda x: x[:, :, :1, :1].reshape(4, 7)[:2]),
        {},
        ValueError,
        r"more than 1 value per channel",
    ),
    (
        "residual-shape",
        lambda a: a,
        dict(residual=torch.randn(4, 7, 3, 2)),
        ValueError,
        r"residual must have x's shape and dtype \(4, 7, 3, 3\)",
    ),
    (
        "residual-dtype",
        lambda a: a,
        dict(residual=torch.randn(4, 7, 3, 3, dtype=torch.float64)),
        ValueError,
        r"residual must have x's shape and dtype .* got \(4, 7, 3, 3\) torch.float64",
    ),
    ("residual-list", lambda a: a, dict(residual=[1.0]), TypeError, r"residual must be a torch.Tensor"),
    (
        "residual-meta",
        lambda a: a,
        dict(residual=torch.randn(4, 7, 3, 3, device="meta")),
        ValueError,
        r"mixed devices.*residual on meta",
    ),
]


@pytest.mark.parametrize("mutate, kwargs, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(mutate, kwargs, error, message):
    args = mutate(_good())
    kwargs = dict(dict(switches=["2x0.5", "1x1.0"], training=True), **kwargs)
    with pytest.raises(error, match=message):
        switch_batch_norm(*args, **kwargs)


def test_checks_run_once_per_call_signature(monkeypatch):
    """A repeated call reuses its checks; a call differing in anything they read is checked anew,
    so bad input still gets its error after good calls of the same layer."""
    calls = []
    original = switch_bn._check
    monkeypatch.setattr(switch_bn, "_CHECKED", switch_bn.checks.CheckedCalls(maxsize=1))
    monkeypatch.setattr(switch_bn, "_check", lambda *args: calls.append(1) or original(*args))
    x, weight, bias, rm, rv = _good()
    switches = SwitchSet.of(["2x0.5", "1x1.0"])
    for _ in range(3):
        switch_batch_norm(x, weight, bias, rm, rv, switches, True)
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"rows \[1, 1\]"):
        switch_batch_norm(x, weight, bias, rm, rv, switches, True, rows=[1, 1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        switch_batch_norm(x[:2, :, :1, :1], weight, bias, rm, rv, switches, True)
    with pytest.raises(TypeError, match="mixed dtypes"):
        switch_batch_norm(x, weight, bias.double(), rm, rv, switches, True)
    switch_batch_norm(x.double(), weight.double(), bias.double(), rm.double(), rv.double(), switches, False)
    switch_batch_norm(x, weight, bias, rm, rv, switches, True)  # evicted by the float64 call (maxsize 1)
    assert len(calls) == 6


def test_one_value_per_channel_is_fine_in_eval():
    x, weight, bias, rm, rv = _good()
    y = switch_batch_norm(x[:2, :, 0, 0], weight, bias, rm, rv, ["2x0.5", "1x1.0"], False)
    assert y.shape == (2, 7)


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_matches_eager(bn_backend):
    torch._dynamo.reset()
    switches = SwitchSet(["2x0.5", "1x0.5"])
    x, weight, bias, rm, rv = _good()

    def f(x, weight, bias, rm, rv):
        return switch_batch_norm(x * 2, weight, bias, rm, rv, switches, True, 0.2, EPS, "relu6", rows=[1, 0]) + 1

    rm_c, rv_c, rm_e, rv_e = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    xc, wc, xe, we = leaf(x), leaf(weight), leaf(x), leaf(weight)
    yc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc, wc, bias, rm_c, rv_c)
    ye = f(xe, we, bias, rm_e, rv_e)
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm_c, rm_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv_c, rv_e, rtol=1e-6, atol=1e-7)
    assert not torch.equal(rm_c, rm) and not torch.equal(rv_c, rv), "compiled call did not update running stats"
    yc.square().sum().backward()
    ye.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wc.grad, we.grad, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- nn module
def test_module_state_dict_matches_batchnorm2d_keys():
    bn = SwitchBatchNorm2d(7, ["2x0.5", "1x1.0", "0.3+0.7"], activation="relu")
    state = bn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert set(state) == set(torch.nn.BatchNorm2d(7).state_dict())
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert state[key].shape == (3, 7), key
    assert state["num_batches_tracked"].shape == (3,)
    assert "switches=[2x0.5, 1x1.0, 0.3+0.7]" in repr(bn) and "activation='relu'" in repr(bn)
    other = SwitchBatchNorm2d(7, ["2x0.5", "1x1.0", "0.3+0.7"], activation="relu")
    with torch.no_grad():
        bn.weight.normal_()
    other.load_state_dict(bn.state_dict())
    assert torch.equal(other.weight, bn.weight)


def test_module_forward_matches_op_and_counts_batches(bn_backend):
    switches = ["2x0.5", "1x0.5"]
    bn = SwitchBatchNorm2d(7, switches, momentum=0.2, activation="relu")
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(4, 7, 3, 3)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x)
    expected = switch_batch_norm(x, bn.weight, bn.bias, rm, rv, switches, True, 0.2, activation="relu")
    assert torch.equal(y, expected)
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    assert bn.num_batches_tracked.tolist() == [1, 1]
    bn.eval()
    y = bn(x)
    assert bn.num_batches_tracked.tolist() == [1, 1] and torch.equal(bn.running_mean, rm)
    expected = switch_batch_norm(x, bn.weight, bn.bias, rm, rv, switches, False, activation="relu")
    assert torch.equal(y, expected)


def test_module_add_activate_is_activation_of_sum(bn_backend):
    """bn.add_activate(x, r, act) == act(bn(x) + r) for a BatchNorm without an activation of its own."""
    switches = ["2x0.5", "1x0.5"]
    bn = SwitchBatchNorm2d(7, switches, momentum=0.2)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    twin = SwitchBatchNorm2d(7, switches, momentum=0.2)
    twin.load_state_dict(bn.state_dict())
    g = torch.Generator().manual_seed(20)
    x, residual = torch.randn(4, 7, 3, 3, generator=g), torch.randn(4, 7, 3, 3, generator=g) * 2
    for activation, act in ((None, lambda t: t), ("relu", torch.relu), ("relu6", lambda t: t.clamp(0, 6))):
        torch.testing.assert_close(bn.add_activate(x, residual, activation), act(twin(x) + residual))
    torch.testing.assert_close(bn.running_mean, twin.running_mean)  # statistics updated alike
    assert bn.num_batches_tracked.tolist() == [3, 3]
    with pytest.raises(ValueError, match="applies 'relu' itself"):
        SwitchBatchNorm2d(7, switches, activation="relu").add_activate(x, residual)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        bn.add_activate(x, residual, "tanh")


def test_module_set_active_trains_only_active_rows(bn_backend):
    bn = SwitchBatchNorm2d(7, ["2x0.5", "1x1.0", "1x0.5"])
    bn.set_active(["1x0.5"])
    bn(torch.randn(3, 7, 2, 2) + 1)
    assert bn.num_batches_tracked.tolist() == [0, 0, 1]
    assert torch.equal(bn.running_mean[:2], torch.zeros(2, 7)) and torch.equal(bn.running_var[:2], torch.ones(2, 7))
    assert torch.count_nonzero(bn.running_mean[2, :4]) == 4 and torch.count_nonzero(bn.running_mean[2, 4:]) == 0


def test_module_momentum_none_is_the_cumulative_average(bn_backend):
    switches = ["2x0.5", "0.5+0.25+0.25"]
    bn = SwitchBatchNorm2d(13, switches, momentum=None)
    g = torch.Generator().manual_seed(16)
    means, variances = [], []
    for step in range(3):
        x = torch.randn(2 * 3, 13, 2, 3, generator=g) * (step + 1) + step
        bn(x)
        xs = x.double().view(2, 3, 13, 2, 3)
        means.append(xs.mean((1, 3, 4)))
        variances.append(xs.var((1, 3, 4), unbiased=True))
    torch.testing.assert_close(bn.running_mean.double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), torch.stack(variances).mean(0), rtol=1e-5, atol=1e-5)
    assert bn.num_batches_tracked.tolist() == [3, 3]


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="unknown activation"):
        SwitchBatchNorm2d(7, ["1x1.0"], activation="tanh")
    with pytest.raises(ValueError, match="empty slice"):
        SwitchBatchNorm2d(3, ["4x0.25"])
