"""The triton backend without a GPU.

- Numerics: tests/triton_interpreter_cases.py runs the kernels on CPU tensors under Triton's
  interpreter against the float64 oracles, in a subprocess with TRITON_INTERPRET=1 (the variable
  must be set before triton is imported and must not leak into the other test files).
- Compilation: every kernel is compiled ahead of time for sm_90 down to a cubin (Triton ships
  ptxas), which catches what the lenient interpreter lets through (types, tl.dot shapes, bf16).
- The tile schedules and the backend's registration, in plain Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from paradis_fast import SwitchSet  # noqa: E402
from paradis_fast.ops import backends  # noqa: E402
from paradis_fast.ops.plan import conv_blocks, iter_blocks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ interpreter
@pytest.mark.parametrize("selection", ["op_conv", "op_bn", "launch"])
def test_kernels_under_the_interpreter(selection):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PARADIS_BACKEND", None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        selection,
        os.path.join(HERE, "triton_interpreter_cases.py"),
    ]
    run = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"interpreter tests failed:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


# ------------------------------------------------------------------------------ compilation
INDEX_TABLES = {"tiles_ptr", "segments_ptr", "covered_ptr", "rows_ptr"}
DATA = {"x_ptr", "y_ptr", "grad_y_ptr", "grad_x_ptr", "w_ptr", "bias_ptr", "out_ptr"}


def _signature(fn, data: str, constexprs: dict) -> dict:
    """Triton signature: int64 tables, `data` activations, fp32 statistics and BN parameters."""

    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in INDEX_TABLES:
            return "*i64"
        if name.endswith("_ptr"):
            return "*" + (data if name in DATA else "fp32")
        return "fp32" if name == "eps" else "i32"

    return {name: kind(name) for name in fn.arg_names}


def _compile_cases():
    """(kernel module, kernel, activation dtype, constexprs): every kernel, GEMMs in bf16 3x3, fp32 and fp64."""
    import triton.language as tl

    gemm = dict(ACC=tl.float32, USE_DOT=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    f64 = dict(ACC=tl.float64, USE_DOT=False, PRECISION="ieee", BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    cases = []
    for name in ("_forward_kernel", "_grad_input_kernel", "_grad_weight_kernel"):
        bias = dict(HAS_BIAS=True) if name == "_forward_kernel" else {}
        cases += [
            ("sliced_conv2d", name, "bf16", dict(gemm, KH=3, KW=3, PRECISION="ieee", **bias)),
            ("sliced_conv2d", name, "fp32", dict(gemm, KH=1, KW=1, PRECISION="tf32", **bias)),
            ("sliced_conv2d", name, "fp64", dict(f64, KH=1, KW=1, **bias)),
        ]
    stats = dict(ACC=tl.float32, BLOCK=1024)
    cases += [
        ("switch_batch_norm", "_welford_partials_kernel", "bf16", stats),
        ("switch_batch_norm", "_normalize_kernel", "bf16", dict(stats, TRAINING=True, ACT=2, CHUNKS_P2=8)),
        ("switch_batch_norm", "_grad_partials_kernel", "fp16", dict(stats, ACT=1)),
        ("switch_batch_norm", "_grad_input_kernel", "fp32", dict(stats, TRAINING=True, ACT=0, CHUNKS_P2=4)),
    ]
    return cases


COMPILE_CASES = _compile_cases()


@pytest.mark.parametrize(
    "module, kernel, data, constexprs", COMPILE_CASES, ids=["-".join(c[:3]) for c in COMPILE_CASES]
)
def test_kernel_compiles_for_sm90(module, kernel, data, constexprs):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"paradis_fast.kernels.{module}"), kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, not compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton 3.9's notice about TRITON_DEFAULT_FP_FUSION
        compiled = triton.compile(
            ASTSource(fn, _signature(fn, data, constexprs), constexprs), target=GPUTarget("cuda", 90, 32)
        )
    assert len(compiled.asm["cubin"]) > 0


# ------------------------------------------------------------------------------ schedules
SCHEDULE_SWITCHES = SwitchSet(["0.3+0.7", "1x0.5", "3x1/3", "1x1.0"])


def _expected_reads(blocks, input_shared, grad_input):
    """(switch, output column) -> the (switch, channel range) segments it must sum, from the blocks."""
    expected = {}
    for s, i0, i1, o0, o1 in iter_blocks(blocks):
        if grad_input:  # grad_x[x switch][:, i] sums grad_y[s][:, out_j] of every block reading i
            key_switch, columns, segment = (0 if input_shared else s), range(i0, i1), (s, o0, o1)
        else:
            key_switch, columns, segment = s, range(o0, o1), ((0 if input_shared else s), i0, i1)
        for column in columns:
            expected.setdefault((key_switch, column), []).append(segment)
    return {key: tuple(value) for key, value in expected.items()}


@pytest.mark.parametrize("input_shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("grad_input", [False, True], ids=["forward", "grad_input"])
def test_gemm_schedule_writes_every_element_once_largest_problem_first(input_shared, grad_input):
    from paradis_fast.kernels.sliced_conv2d import TILE_FIELDS, forward_schedule, grad_input_schedule

    c_in, c_out, block_n = (3 if input_shared else 37), 29, 16
    blocks = conv_blocks(SCHEDULE_SWITCHES, c_in, c_out, input_shared)
    schedule = grad_input_schedule if grad_input else forward_schedule
    tiles, segments = schedule(blocks, input_shared, block_n)
    tiles = [tiles[k : k + TILE_FIELDS.value] for k in range(0, len(tiles), TILE_FIELDS.value)]
    segments = [tuple(segments[k : k + 3]) for k in range(0, len(segments), 3)]
    computed, problems = {}, {}
    for switch, n0, n_stop, first, stop in tiles:
        problems.setdefault((switch, n_stop, first, stop), n0)  # a problem's first tile starts it
        for column in range(n0, min(n0 + block_n, n_stop)):
            assert (switch, column) not in computed, "an output element is written by two programs"
            computed[(switch, column)] = tuple(segments[first:stop])
    assert computed == _expected_reads(blocks, input_shared, grad_input)
    work = [
        (n_stop - n_start) * sum(k1 - k0 for _, k0, k1 in segments[first:stop])
        for (_, n_stop, first, stop), n_start in problems.items()
    ]
    assert work == sorted(work, reverse=True), "problems are not ordered by work"


@pytest.mark.parametrize("input_shared", [False, True], ids=["stacked", "shared"])
def test_grad_weight_schedule_sums_every_overlapping_block(input_shared):
    from paradis_fast.kernels.sliced_conv2d import WEIGHT_SEGMENT_FIELDS, WEIGHT_TILE_FIELDS, grad_weight_schedule

    c_in, c_out, taps, bm, bn = (3 if input_shared else 37), 29, 9, 16, 32
    blocks = conv_blocks(SCHEDULE_SWITCHES, c_in, c_out, input_shared)
    tiles, segments = grad_weight_schedule(blocks, input_shared, taps, c_out, c_in, bm, bn)
    tiles = [tiles[k : k + WEIGHT_TILE_FIELDS.value] for k in range(0, len(tiles), WEIGHT_TILE_FIELDS.value)]
    segments = [
        segments[k : k + WEIGHT_SEGMENT_FIELDS.value] for k in range(0, len(segments), WEIGHT_SEGMENT_FIELDS.value)
    ]
    summed = torch.zeros(c_out, c_in * taps, dtype=torch.long)
    for m0, n0, first, stop in tiles:
        assert m0 % bm == 0 and n0 % bn == 0
        listed = segments[first:stop]
        assert [seg[0] for seg in listed] == sorted(seg[0] for seg in listed), "blocks not in switch order"
        for s_y, s_x, o0, o1, q0, q1 in listed:
            assert s_x == (0 if input_shared else s_y)
            summed[max(o0, m0) : min(o1, m0 + bm), max(q0, n0) : min(q1, n0 + bn)] += 1
    expected = torch.zeros_like(summed)
    for s, i0, i1, o0, o1 in iter_blocks(blocks):
        expected[o0:o1, i0 * taps : i1 * taps] += 1
    assert torch.equal(summed, expected), "a weight element does not sum exactly the blocks that use it"
    counts = [stop - first for _, _, first, stop in tiles]
    assert counts == sorted(counts, reverse=True), "tiles are not ordered by work"


# ------------------------------------------------------------------------------ registration
def test_registered_as_the_cuda_kernels():
    """The Triton kernels serve CUDA tensors through the paradis ops (switch_batch_norm's where the
    build has no CUDA C++ kernel); on CPU tensors the C++ kernels stay, the interpreter is for tests."""
    for op in ("sliced_conv2d", "sliced_conv2d_backward", "switch_batch_norm", "switch_batch_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"paradis::{op}", "CUDA"), op
    assert "cuda" in backends.available_backends("sliced_conv2d", "cuda")
    assert backends.backend_for("sliced_conv2d", torch.device("cpu")).name != "cuda"
