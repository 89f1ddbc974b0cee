"""The paradis ops' CUDA kernels (Triton's, and the CUDA C++ switch_batch_norm where built) on CUDA
tensors against the float64 oracles, fp32 and bf16.

Skipped, with the reason, where torch sees no CUDA device (CI; the kernels are checked there by
test_triton_kernels.py and test_cuda_sources.py). bench/gpu_check.sh runs this file on a GPU.
Inputs are rounded to the tested dtype first and the oracle runs in float64 on those same values,
so the tolerances measure the kernels' accumulation and output rounding only. TF32 is turned off:
fp32 means fp32 here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import bn_oracle
import conv_oracle
from conftest import BN_CASES, CONV_CASES, _bn_id, _conv_id
from paradis_fast import SwitchSet
from paradis_fast.models import mobilenet_v1
from paradis_fast.ops import library, sliced_conv2d, switch_batch_norm, triton_kernels, use_backend

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU backends cannot run here"
)

CUDA = torch.device("cuda")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

# the op matrix of the CPU tests (every option), plus layer sizes of real networks
BIG_CONV = [
    dict(
        seed=101,
        switches=["1x1.0", "2x0.5", "4x0.25"],
        c_in=64,
        c_out=128,
        kernel=3,
        stride=1,
        padding=1,
        dilation=1,
        batch=8,
        input_shared=False,
        bias=False,
        hw=(16, 16),
    ),
    dict(
        seed=102,
        switches=["1x1.0", "0.5+0.25+0.25", "3x1/3"],
        c_in=3,
        c_out=32,
        kernel=3,
        stride=2,
        padding=1,
        dilation=1,
        batch=8,
        input_shared=True,
        bias=False,
        hw=(32, 32),
    ),
    dict(
        seed=103,
        switches=["1x1.0", "2x0.5", "1x0.5"],
        c_in=96,
        c_out=80,
        kernel=1,
        stride=1,
        padding=0,
        dilation=1,
        batch=16,
        input_shared=False,
        bias=True,
        hw=(8, 8),
    ),
]
CONV_MATRIX = CONV_CASES[::6] + BIG_CONV
BIG_BN = [
    dict(
        seed=201,
        dtype=torch.float32,
        training=training,
        activation="relu",
        channels=96,
        switches=["1x1.0", "2x0.5", "0.3+0.7"],
        batch=16,
        spatial=(16, 16),
        num_rows=4,
        rows=[3, 0, 1],
    )
    for training in (True, False)
]
BN_MATRIX = [c for c in BN_CASES if c["dtype"] == torch.float32][::2] + BIG_BN


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _kernels(source: str, op: str):
    """The CUDA kernels as this build registers them ("registered"), or Triton's over the CUDA C++
    ones ("triton": skipped where Triton's are the registered ones already)."""
    native = torch._C._dispatch_has_kernel_for_dispatch_key(f"paradis::{op}", "CUDA")
    if not native:
        pytest.skip(f"no CUDA kernel for {op} in this build (is triton installed?)")
    if source == "registered":
        with use_backend("cuda"):
            yield
        return
    if op in library.TRITON_CUDA_OPS:
        pytest.skip(f"Triton's {op} kernels are the registered ones in this build")
    with torch.library._scoped_library("paradis", "IMPL") as lib:
        triton_kernels.register(lib, "cuda", [op])
        with use_backend("cuda"):
            yield


def _rounded(t, dtype):
    """t rounded to dtype (what the kernel sees) and back in float64 (what the oracle sees)."""
    return None if t is None else t.to(dtype), None if t is None else t.to(dtype).double()


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _assert_close(got, want, dtype, what):
    torch.testing.assert_close(got.double().cpu(), want.cpu(), **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------- sliced_conv2d
@pytest.mark.parametrize("case", CONV_MATRIX, ids=[_conv_id(c) for c in CONV_MATRIX])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_sliced_conv2d_matches_oracle(dtype, case):
    x, weight, bias, g = conv_oracle.make_inputs(case, torch.float64)
    grad_seed = torch.Generator().manual_seed(case["seed"] + 1)
    stride, padding, dilation, shared = conv_oracle.conv_args(case)
    (x, xr), (weight, wr), (bias, br) = (_rounded(t, dtype) for t in (x, weight, bias))
    xr, wr, br = _leaf(xr), _leaf(wr), _leaf(br)
    yr = conv_oracle.oracle(xr, wr, br, case["switches"], stride, padding, dilation, shared)
    grad_y, grad_yr = _rounded(torch.randn(yr.shape, generator=grad_seed, dtype=torch.float64), dtype)
    yr.backward(grad_yr)
    with _kernels("registered", "sliced_conv2d"):
        xo, wo, bo = (_leaf(None if t is None else t.to(CUDA)) for t in (x, weight, bias))
        y = sliced_conv2d(xo, wo, bo, case["switches"], stride, padding, dilation, shared)
        y.backward(grad_y.to(CUDA))
    assert y.dtype == dtype and y.device.type == CUDA.type
    _assert_close(y, yr.detach(), dtype, "forward")
    _assert_close(xo.grad, xr.grad, dtype, "grad x")
    _assert_close(wo.grad, wr.grad, dtype, "grad weight")
    if bias is not None:
        _assert_close(bo.grad, br.grad, dtype, "grad bias")
    conv_oracle.assert_uncovered_exact_zeros(case, y.cpu(), xo.grad.cpu(), wo.grad.cpu(), None)


def test_sliced_conv2d_gradients_are_deterministic():
    case = BIG_CONV[0]
    x, weight, _, _ = conv_oracle.make_inputs(case, torch.float32)
    with _kernels("registered", "sliced_conv2d"):
        grads = []
        for _ in range(2):
            xo, wo = _leaf(x.to(CUDA)), _leaf(weight.to(CUDA))
            y = sliced_conv2d(xo, wo, None, case["switches"], padding=1)
            y.backward(torch.ones_like(y))
            grads.append((xo.grad, wo.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


# ----------------------------------------------------------------------------- switch_batch_norm
@pytest.mark.parametrize("case", BN_MATRIX, ids=[_bn_id(c) for c in BN_MATRIX])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("source", ["registered", "triton"])
def test_switch_batch_norm_matches_oracle(source, dtype, case):
    """x (and grad_y) in dtype, float32 parameters and running statistics, as a mixed-precision model."""
    (x, weight, bias, running_mean, running_var), g = bn_oracle.make_inputs(dict(case, dtype=torch.float64))
    rows = case["rows"] if case["rows"] is not None else list(range(len(case["switches"])))
    x, xr = _rounded(x, dtype)
    params = [t.float() for t in (weight, bias, running_mean, running_var)]
    xr, wr, br = _leaf(xr), _leaf(params[0].double()), _leaf(params[1].double())
    yr, stats = bn_oracle.oracle(
        xr,
        wr,
        br,
        params[2].double(),
        params[3].double(),
        case["switches"],
        case["training"],
        bn_oracle.EPS,
        case["activation"],
        rows,
    )
    grad_y, grad_yr = _rounded(torch.randn(yr.shape, generator=g, dtype=torch.float64), dtype)
    yr.backward(grad_yr)
    with _kernels(source, "switch_batch_norm"):
        xo, wo, bo = _leaf(x.to(CUDA)), _leaf(params[0].to(CUDA)), _leaf(params[1].to(CUDA))
        running = [params[2].to(CUDA, copy=True), params[3].to(CUDA, copy=True)]
        y = switch_batch_norm(
            xo,
            wo,
            bo,
            *running,
            case["switches"],
            case["training"],
            0.1,
            bn_oracle.EPS,
            case["activation"],
            rows=case["rows"],
        )
        y.backward(grad_y.to(CUDA))
    assert y.dtype == dtype and y.device.type == CUDA.type
    _assert_close(y, yr.detach(), dtype, "forward")
    _assert_close(xo.grad, xr.grad, dtype, "grad x")
    _assert_close(wo.grad, wr.grad, torch.float32, "grad weight")  # float32 parameters: no output rounding
    _assert_close(bo.grad, br.grad, torch.float32, "grad bias")
    bn_oracle.check_zeros_outside(
        case["switches"], rows, case["num_rows"], case["channels"], y.cpu(), xo.grad.cpu(), wo.grad.cpu(), bo.grad.cpu()
    )
    if case["training"]:  # the running statistics moved towards the batch ones, covered channels only
        for c, r, mean, var, count in stats:
            expected = 0.9 * params[2][r, :c].double() + 0.1 * mean
            _assert_close(running[0][r, :c], expected, torch.float32, "running mean")
            unbiased = var * count / max(count - 1, 1)
            _assert_close(
                running[1][r, :c], 0.9 * params[3][r, :c].double() + 0.1 * unbiased, torch.float32, "running var"
            )


# ----------------------------------------------------------------------------------- end to end
def test_training_step_matches_the_reference_backend():
    """A MobileNet training step with the automatic GPU backends equals the reference backend's."""
    torch.manual_seed(0)
    model = mobilenet_v1(
        num_classes=10, switches=["1x1.0", "2x0.5", "0.5+0.25+0.25"], width_mult=0.25, small_input=True
    ).to(CUDA)
    images = torch.randn(8, 3, 32, 32, device=CUDA)
    results = []
    for backend in (None, "reference"):
        replica = mobilenet_v1(
            num_classes=10, switches=["1x1.0", "2x0.5", "0.5+0.25+0.25"], width_mult=0.25, small_input=True
        ).to(CUDA)
        replica.load_state_dict(model.state_dict())
        with use_backend(backend):
            logits = replica(images)
            logits.square().mean().backward()
        results.append(
            (
                logits.detach(),
                {n: p.grad for n, p in replica.named_parameters()},
                {n: b.clone() for n, b in replica.named_buffers()},
            )
        )
    (logits, grads, buffers), (logits_ref, grads_ref, buffers_ref) = results
    torch.testing.assert_close(logits, logits_ref, rtol=1e-3, atol=1e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")
    for name, buffer in buffers.items():
        torch.testing.assert_close(buffer, buffers_ref[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_torch_compile_fullgraph_on_gpu():
    """The custom ops stay opaque to torch.compile (inductor) and run the GPU kernels inside."""
    torch._dynamo.reset()
    switches = SwitchSet(["2x0.5", "0.3+0.7"])
    x = torch.randn(8, 16, 8, 8, device=CUDA)
    weight, bn_weight = torch.randn(24, 16, 3, 3, device=CUDA), torch.rand(2, 24, device=CUDA) + 0.5
    bn_bias, running_mean, running_var = (
        torch.zeros(2, 24, device=CUDA),
        torch.zeros(2, 24, device=CUDA),
        torch.ones(2, 24, device=CUDA),
    )

    def f(x, weight):
        y = sliced_conv2d(x, weight, None, switches, padding=1)
        return switch_batch_norm(
            y, bn_weight, bn_bias, running_mean.clone(), running_var.clone(), switches, True, activation="relu"
        )

    compiled = torch.compile(f, fullgraph=True)
    xs, ws = _leaf(x), _leaf(weight)
    compiled(xs, ws).square().sum().backward()
    xe, we = _leaf(x), _leaf(weight)
    f(xe, we).square().sum().backward()
    torch.testing.assert_close(xs.grad, xe.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ws.grad, we.grad, rtol=1e-4, atol=1e-4)
