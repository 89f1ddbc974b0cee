"""Shared fixtures of the paradis_fast tests.

- switch pools (uniform, unequal, narrow) and `draw_switch_set`, which draws a random, valid
  (no empty slice) switch set for given channel counts, computing the slices independently of
  `paradis_fast.switches`;
- seeded random case matrices for the op tests: a test that takes a `conv_case` or `bn_case`
  argument is parametrized over them (see `pytest_generate_tests`);
- backend parametrisation: the fixtures `conv_backend` / `bn_backend` run a test once per backend
  in `available_backends(op)` (today 'reference'; 'cpu' and others appear once they are built),
  with that backend forced through `use_backend` for the whole test;
- PARADIS_CPU_CONV_PATH=native unless set (below).
"""

from __future__ import annotations

import math
import os
import random
import sys
import warnings
from fractions import Fraction

import pytest
import torch

try:
    import paradis_fast  # noqa: F401
except ImportError:  # running `pytest` from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import paradis_fast  # noqa: F401

from paradis_fast.ops import available_backends, use_backend


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists the instruction-set flag (avx512f, ...)."""
    try:
        with open("/proc/cpuinfo") as info:
            return f" {flag}" in info.read()
    except OSError:
        return False


if not cpu_has("avx512f"):
    # PyTorch 2.13's oneDNN corrupted the heap in convolution backward on an AVX2-only host (AMD
    # EPYC: glibc aborted inside its brgemm JIT in 1 of 6 ResNet20 steps on the reference backend,
    # plain ATen ops only; none of 6 with oneDNN off; bench/README.md): there the tests run ATen's
    # own convolutions. Hosts with AVX-512 keep oneDNN. Without oneDNN ATen takes NNPACK for
    # batches of 16 or more, 10-100x slower than its im2col + GEMM on the small images of the
    # training tests (a MobileNet step on 8x8 digits: 620 ms against 87 ms), so NNPACK goes too.
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)

# The CPU convolution's per-shape path is chosen by timing (csrc/cpu/measured_choice.h), so two
# layer shapes may round differently from run to run; the suite runs the fixed rules unless a test
# sets the variable itself (the choice's own tests, and the oracle matrix over every path).
os.environ.setdefault("PARADIS_CPU_CONV_PATH", "native")

# --------------------------------------------------------------------------------------------
# switches
UNIFORM = ("1x1.0", "2x0.5", "4x0.25")
UNEQUAL = ("0.3+0.7", "0.5+0.25+0.25", "3x1/3")
NARROW = ("1x0.5", "2x0.25")
ALL_SWITCHES = UNIFORM + UNEQUAL + NARROW


def spelled_widths(spelling: str) -> list[Fraction]:
    """Widths of one of the pool spellings, parsed here without paradis_fast (for the oracles)."""
    if "x" in spelling:
        count, width = spelling.split("x")
        return [Fraction(width)] * int(count)
    return [Fraction(part) for part in spelling.split("+")]


def expected_bounds(widths, channels: int) -> list[int]:
    """b_0 = 0, b_j = floor(C * (w_1 + ... + w_j) + 1/2), with exact fractions (DESIGN §1)."""
    bounds, total = [0], Fraction(0)
    for w in widths:
        total += Fraction(w)
        bounds.append(math.floor(channels * total + Fraction(1, 2)))
    return bounds


def fits(spelling: str, channels: int) -> bool:
    bounds = expected_bounds(spelled_widths(spelling), channels)
    return all(a < b for a, b in zip(bounds[:-1], bounds[1:]))


def draw_switch_set(rng: random.Random, channel_counts, first: str | None = None, max_switches: int = 3) -> list[str]:
    """1..max_switches distinct pool switches (starting with `first`) that slice every channel count."""
    pool = [s for s in ALL_SWITCHES if all(fits(s, c) for c in channel_counts)]
    chosen = [first] if first is not None and first in pool else []
    count = rng.randint(1, max_switches)
    rest = [s for s in pool if s not in chosen]
    rng.shuffle(rest)
    chosen += rest[: max(0, count - len(chosen))]
    return chosen


# --------------------------------------------------------------------------------------------
# random case matrices
CHANNELS = (5, 7, 13)


def _conv_cases(count: int = 24, seed: int = 1234) -> list[dict]:
    cases = []
    for i in range(count):
        rng = random.Random(seed + i)
        input_shared = rng.random() < 0.3
        c_in = rng.choice((3,) + CHANNELS) if input_shared else rng.choice(CHANNELS)
        c_out = rng.choice(CHANNELS)
        sliced = [c_out] if input_shared else [c_in, c_out]
        kernel = rng.choice((1, 3))
        dilation = rng.choice((1, 2))
        padding = rng.choice((0, 1))
        stride = rng.choice((1, 2))
        smallest = dilation * (kernel - 1) + 1 - 2 * padding
        case = dict(
            seed=seed + i,
            switches=draw_switch_set(rng, sliced, first=ALL_SWITCHES[i % len(ALL_SWITCHES)]),
            c_in=c_in,
            c_out=c_out,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            batch=rng.choice((1, 3)),
            input_shared=input_shared,
            bias=rng.random() < 0.6,
            hw=(max(smallest, rng.randint(4, 8)), max(smallest, rng.randint(4, 8))),
        )
        cases.append(case)
    # the matrix must exercise every option (a fixed seed makes this a one-time check)
    for key, values in dict(
        kernel=(1, 3),
        stride=(1, 2),
        padding=(0, 1),
        dilation=(1, 2),
        batch=(1, 3),
        input_shared=(False, True),
        bias=(False, True),
    ).items():
        assert {c[key] for c in cases} == set(values), f"conv case matrix misses a value of {key}"
    assert {s for c in cases for s in c["switches"]} == set(ALL_SWITCHES)
    return cases


def _conv_id(case: dict) -> str:
    flags = ("shared" if case["input_shared"] else "") + ("bias" if case["bias"] else "")
    return (
        f"{'|'.join(case['switches'])}-{case['c_in']}to{case['c_out']}-k{case['kernel']}s{case['stride']}"
        f"p{case['padding']}d{case['dilation']}-b{case['batch']}-{flags or 'plain'}"
    )


def _bn_cases(seed: int = 4321) -> list[dict]:
    cases, i = [], 0
    for dtype in (torch.float32, torch.float64):
        for training in (True, False):
            for activation in (None, "relu", "relu6"):
                for _ in range(2):
                    rng = random.Random(seed + i)
                    channels = rng.choice(CHANNELS)
                    switches = draw_switch_set(rng, [channels], first=ALL_SWITCHES[i % len(ALL_SWITCHES)])
                    extra = rng.choice((0, 0, 1, 2))  # parameter rows of switches that do not run
                    rows = (
                        rng.sample(range(len(switches) + extra), len(switches)) if extra or rng.random() < 0.5 else None
                    )
                    # rows of >= 256 values (16x17) run the NCHW per-channel kernels, shorter ones image order
                    spatial = rng.choice(((3, 3), (2, 3), (4, 1), (1, 1), (5,), (), (16, 17)))
                    cases.append(
                        dict(
                            seed=seed + i,
                            dtype=dtype,
                            training=training,
                            activation=activation,
                            channels=channels,
                            switches=switches,
                            batch=rng.choice((2, 3)),
                            spatial=spatial,
                            num_rows=len(switches) + extra,
                            rows=rows,
                        )
                    )
                    i += 1
    assert {s for c in cases for s in c["switches"]} == set(ALL_SWITCHES)
    return cases


def _bn_id(case: dict) -> str:
    dtype = str(case["dtype"]).replace("torch.", "")
    mode = "train" if case["training"] else "eval"
    rows = "" if case["rows"] is None else "-rows" + "".join(map(str, case["rows"])) + f"of{case['num_rows']}"
    shape = "x".join(map(str, case["spatial"])) or "flat"
    return (
        f"{'|'.join(case['switches'])}-c{case['channels']}-b{case['batch']}-{shape}-{mode}-"
        f"{case['activation']}-{dtype}{rows}"
    )


CONV_CASES = _conv_cases()
BN_CASES = _bn_cases()


def pytest_generate_tests(metafunc):
    if "conv_case" in metafunc.fixturenames:
        metafunc.parametrize("conv_case", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
    if "bn_case" in metafunc.fixturenames:
        metafunc.parametrize("bn_case", BN_CASES, ids=[_bn_id(c) for c in BN_CASES])


# --------------------------------------------------------------------------------------------
# backends
def _backends(op: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "extension not built" is reported once by the library
        return available_backends(op, "cpu")


CONV_BACKENDS = _backends("sliced_conv2d")
BN_BACKENDS = _backends("switch_batch_norm")


@pytest.fixture(params=CONV_BACKENDS)
def conv_backend(request):
    """Runs the test once per backend that can run sliced_conv2d on CPU tensors, that backend forced."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture(params=BN_BACKENDS)
def bn_backend(request):
    """Runs the test once per backend that can run switch_batch_norm on CPU tensors, that backend forced."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
