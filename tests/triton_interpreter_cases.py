"""The Triton kernels on CPU tensors under Triton's interpreter, against the float64 oracles.

The op-level cases are the bodies of test_sliced_conv.py and test_switch_batch_norm.py, run here
with the Triton kernels registered as the paradis ops' CPU kernels; the launcher-level cases exercise what the tiny shapes of those
cases do not reach (several chunks per BatchNorm pair, split-K weight gradients, fp16).

tests/test_triton_kernels.py runs this file in a subprocess with TRITON_INTERPRET=1: the variable
must be set before the kernels are imported, and must not leak into the other test files. The
name does not start with test_, so a plain `pytest` run does not collect it.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_triton_kernels.py with TRITON_INTERPRET=1", allow_module_level=True)

import conv_oracle  # noqa: E402
import test_sliced_conv as conv_tests  # noqa: E402  (the test bodies of the ops, run here with Triton kernels)
import test_switch_batch_norm as bn_tests  # noqa: E402
from conftest import BN_CASES, CONV_CASES, _bn_id, _conv_id  # noqa: E402

from paradis_fast import SwitchSet  # noqa: E402
from paradis_fast.kernels import sliced_conv2d as conv_kernels  # noqa: E402
from paradis_fast.kernels import split_evenly  # noqa: E402
from paradis_fast.kernels import switch_batch_norm as bn_kernels  # noqa: E402
from paradis_fast.ops import reference, triton_kernels, use_backend  # noqa: E402
from paradis_fast.ops.plan import conv_blocks, covered_channels  # noqa: E402


@pytest.fixture
def triton_backend():
    """The Triton kernels as the paradis ops' CPU kernels (over the C++ ones) for the test."""
    with torch.library._scoped_library("paradis", "IMPL") as lib:
        triton_kernels.register(lib, "cpu")
        with use_backend("cpu"):
            yield "triton"


def _reference_grads(fn, inputs, grad_y):
    """The gradients of fn(*inputs)'s first output towards grad_y, for the inputs that need one."""
    leaves = [t.detach().requires_grad_() if needed else t for t, needed in inputs]
    out = fn(*leaves)
    y = out[0] if isinstance(out, tuple) else out
    wanted = [t for t, (_, needed) in zip(leaves, inputs) if needed]
    return out, torch.autograd.grad(y, wanted, grad_y)


# ------------------------------------------------------------------------- sliced_conv2d (op)
@pytest.mark.parametrize("case", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_op_conv_matches_oracle_f32(case, triton_backend):
    conv_tests.test_matches_masked_dense_oracle(case, torch.float32, triton_backend)


@pytest.mark.parametrize("case", CONV_CASES[:4], ids=[_conv_id(c) for c in CONV_CASES[:4]])
def test_op_conv_matches_oracle_f64(case, triton_backend):
    conv_tests.test_matches_masked_dense_oracle(case, torch.float64, triton_backend)


@pytest.mark.parametrize("input_shared", [False, True], ids=["stacked", "shared"])
def test_op_conv_uncovered_channels_are_exactly_zero(triton_backend, input_shared):
    conv_tests.test_uncovered_channels_are_exactly_zero(triton_backend, input_shared)


def test_op_conv_non_contiguous_inputs(triton_backend):
    conv_tests.test_non_contiguous_inputs(triton_backend)


def test_op_conv_partial_gradients(triton_backend):
    conv_tests.test_grad_without_bias_and_partial_requires_grad(triton_backend)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_op_conv_opcheck(triton_backend, layout):
    conv_tests.test_opcheck(conv_tests.OPCHECK_CASES[1], triton_backend, layout)


# --------------------------------------------------------------------- switch_batch_norm (op)
@pytest.mark.parametrize("case", BN_CASES, ids=[_bn_id(c) for c in BN_CASES])
def test_op_bn_matches_oracle(case, triton_backend):
    bn_tests.check_against_oracle(case, "nchw")


@pytest.mark.parametrize("x_dtype, tol", [(torch.float64, 1e-5), (torch.bfloat16, 5e-2)], ids=["f64", "bf16"])
def test_op_bn_float32_parameters_with_other_input_dtype(triton_backend, x_dtype, tol):
    bn_tests.test_float32_parameters_with_other_input_dtype(triton_backend, x_dtype, tol)


def test_op_bn_relu6_saturates(triton_backend):
    bn_tests.test_relu6_saturates_and_passes_no_gradient_there(triton_backend)


@pytest.mark.parametrize("rows", [[3, 1], [0, 1]], ids=["any-rows", "leading-rows"])
def test_op_bn_running_stats_rows_subset(triton_backend, rows):
    bn_tests.test_running_stats_rows_subset(triton_backend, None, rows)  # the update the op picks


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_bn_opcheck(triton_backend, training):
    bn_tests.test_opcheck(triton_backend, training, "relu")


# ----------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("chunks", [2, 3, 5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_launch_bn_chunked_pairs_match_reference(chunks, training):
    """Several programs per (switch, channel): the Welford partials and the sums merge exactly."""
    g = torch.Generator().manual_seed(chunks)
    switches = SwitchSet(["0.3+0.7", "1x0.5", "3x1/3"])
    x = torch.randn(3 * 4, 7, 6, 5, generator=g, dtype=torch.float64) * 3 + 1
    weight, bias, running_mean = (torch.randn(4, 7, generator=g, dtype=torch.float64) for _ in range(3))
    running_var = torch.rand(4, 7, generator=g, dtype=torch.float64) + 0.5
    covered, rows = list(covered_channels(switches, 7)), [3, 0, 1]
    assert bn_kernels.chunking(3 * 7, 4 * 6 * 5, chunks)[2] == chunks, "the pairs are not split as asked"
    args = (weight, bias, running_mean, running_var, covered, rows, training, 1e-5, "relu6")
    got = bn_kernels.switch_batch_norm_forward(x.float(), *(t.float() for t in args[:4]), *args[4:], chunks=chunks)
    grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64)
    inputs = [(x, True), (weight, True), (bias, True), *((a, False) for a in args[2:])]
    want, want_grads = _reference_grads(reference.switch_batch_norm, inputs, grad_y)
    for name, a, b in zip(("y", "mean", "var"), got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    stats = (want[1], want[2])
    got = bn_kernels.switch_batch_norm_backward(
        grad_y.float(),
        x.float(),
        weight.float(),
        bias.float(),
        *(t.float() for t in stats),
        covered,
        rows,
        training,
        1e-5,
        "relu6",
        chunks=chunks,
    )
    for name, a, b in zip(("grad x", "grad weight", "grad bias"), got, want_grads):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


CONV_LAUNCH = dict(
    switches=["0.3+0.7", "2x0.5", "1x1.0"],
    c_in=13,
    c_out=7,
    kernel=3,
    stride=2,
    padding=1,
    dilation=1,
    batch=2,
    input_shared=False,
    hw=(9, 7),
)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("input_shared", [False, True], ids=["stacked", "shared"])
def test_launch_conv_split_k_weight_gradient(splits, input_shared):
    """grad_weight with the pixel reduction split over programs, then summed, as the reference."""
    case = dict(CONV_LAUNCH, input_shared=input_shared, c_in=3 if input_shared else 13)
    switches = SwitchSet(case["switches"])
    g = torch.Generator().manual_seed(splits)
    rows = case["batch"] * (1 if input_shared else len(switches))
    x = torch.randn(rows, case["c_in"], *case["hw"], generator=g, dtype=torch.float64)
    weight = torch.randn(case["c_out"], case["c_in"], 3, 3, generator=g, dtype=torch.float64)
    blocks = list(conv_blocks(switches, case["c_in"], case["c_out"], input_shared))
    conv = (blocks, len(switches), [2, 2], [1, 1], [1, 1], input_shared)
    grad_y = torch.randn(reference.sliced_conv2d(x, weight, None, *conv).shape, generator=g, dtype=torch.float64)
    pixels = case["batch"] * grad_y.shape[2] * grad_y.shape[3]
    assert split_evenly(pixels, splits, 32)[1] == splits, "the pixel reduction is not split as asked"
    _, got, _ = conv_kernels.sliced_conv2d_backward(
        grad_y.float(), x.float(), weight.float(), *conv, [False, True, False], splits=splits
    )
    _, (want,) = _reference_grads(
        reference.sliced_conv2d, [(x, False), (weight, True), (None, False), *((a, False) for a in conv)], grad_y
    )
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_launch_conv_float16_with_float32_accumulation(triton_backend):
    """16-bit in and out, fp32 accumulation: within fp16 rounding of the float64 oracle. (bf16 takes
    the same path; the interpreter's tl.dot cannot multiply bf16, so bf16 is checked on a GPU.)"""
    case = dict(CONV_LAUNCH, bias=True, seed=7)
    x, weight, bias, g = conv_oracle.make_inputs(case, torch.float16)
    op, ref = conv_oracle.run_both(case, x, weight, bias, g)
    for name, got, want in zip(("y", "grad x", "grad weight", "grad bias"), op, ref):
        assert got.dtype == torch.float16, name
        torch.testing.assert_close(got.double(), want, rtol=5e-3, atol=5e-3, msg=lambda m: f"{name}: {m}")
