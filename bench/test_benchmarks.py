"""bench/run.py's comparisons as a pytest-benchmark suite, so runs can be saved and compared.

Each case times forward+backward of one method on one layer (or one training step): paradis_fast
(`paradis`, in the layout the models run in) beside the plain-PyTorch ways bench/run.py builds,
the loop (a) and every variant of (b) (not (c): compiling every layer takes minutes), one table
group per layer. CUDA when torch sees a GPU, else CPU. pyproject's `testpaths` keeps it out of the
default `python -m pytest` run.

    python -m pytest bench --benchmark-only                              # time every case
    python -m pytest bench --benchmark-only -k "bn_ and paradis"         # a subset
    python -m pytest bench --benchmark-only --benchmark-save=NAME        # store in .benchmarks/
    python -m pytest bench --benchmark-only --benchmark-compare          # against the latest stored run
    python -m pytest bench --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%
"""

from __future__ import annotations

from paradis_fast import SwitchSet, memory  # first: before torch loads OpenMP (paradis_fast/_openmp.py)
from paradis_fast.train import InplaceDistillationLoss

import pytest
import torch

import run  # bench/ modules: pytest puts this test file's folder on sys.path
import suites
import timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARGS = run.parse_args(["--no-compile", "--device", DEVICE])
SWITCHES = SwitchSet(suites.SWITCHES)
# the quick suite, plus what it lacks: a shallow layer on large images, a strided one, unequal widths
CONV_LAYERS = tuple(
    layer
    for layer in suites.CONV_LAYERS
    if layer in suites.QUICK_CONV_LAYERS
    or layer.name in ("resnet20 3x3 16-16 @32", "resnet20 1x1 s2 32-64 @16", "wdsr_b 3x3 25-32 @32")
)


def layer_id(name: str) -> str:
    """'mbv1.pw2 64-128 @16' -> 'mbv1.pw2_64-128_at16': an id that -k expressions can name."""
    return name.replace(" @", " at").replace(" ", "_")


def method_id(method: str) -> str:
    """run.py's method names as ids: 'a' -> 'loop', 'b:masked@nhwc' -> 'masked_nhwc', 'd@nhwc' -> 'paradis_nhwc'."""
    base, _, layout = method.partition("@")
    name = {"a": "loop", "d": "paradis"}.get(base, base.removeprefix("b:"))
    return f"{name}_{layout}" if layout else name


def benchmark_group(name: str):
    """Cases of a group share a table; each makes 3 untimed calls (calibration, warm-up) before its timed rounds."""
    return pytest.mark.benchmark(group=name, warmup=True, warmup_iterations=1)


def cases(kind: str, layers, methods_of):
    """One case per layer and method, grouped per layer."""
    for layer in layers:
        group = benchmark_group(f"{kind} fwd+bwd {layer.name}")
        for method in methods_of(layer):
            yield pytest.param(layer, method, id=f"{layer_id(layer.name)}-{method_id(method)}", marks=group)


def conv_methods(layer: suites.ConvLayer):
    """run.py's methods, with the (b) variants it adds on CUDA (a case skips those this GPU cannot run)."""
    fns, cuda_only = run.conv_methods(layer, SWITCHES, ARGS)
    return {**fns, **cuda_only}


def bn_methods(layer: suites.BNLayer):
    return run.bn_methods(layer, SWITCHES, ARGS)


def synchronized(fn):
    def call():
        fn()
        timing.synchronize(DEVICE)

    return call


def benchmark_fwd_bwd(benchmark, method, fn, inputs, grad_out):
    _, fwd_bwd = run.fwd_and_fwd_bwd({method: fn}, inputs, grad_out, ARGS)
    benchmark(synchronized(fwd_bwd[method]))


@pytest.fixture(scope="session", autouse=True)
def keep_freed_memory():
    memory.configure(ARGS)  # as bench/run.py and the trainer do, for every method alike


@pytest.mark.parametrize("layer,method", cases("sliced_conv2d", CONV_LAYERS, conv_methods))
def test_sliced_conv2d(benchmark, layer, method):
    inputs, grad_out = run.conv_inputs(layer, SWITCHES, ARGS)
    fns, cuda_only = run.conv_methods(layer, SWITCHES, ARGS)
    fns.update(run.runnable(cuda_only, inputs, grad_out, ARGS))
    if method not in fns:
        pytest.skip(f"{method} does not run on this GPU")
    benchmark_fwd_bwd(benchmark, method, fns[method], inputs, grad_out)


@pytest.mark.parametrize("layer,method", cases("switch_batch_norm+relu", suites.BN_LAYERS, bn_methods))
def test_switch_batch_norm_relu(benchmark, layer, method):
    inputs, grad_out = run.bn_inputs(layer, SWITCHES, ARGS)
    benchmark_fwd_bwd(benchmark, method, bn_methods(layer)[method], inputs, grad_out)


@pytest.mark.parametrize("method", ["a", "b:loop" + run.NHWC, "d" + run.model_layout(ARGS)], ids=method_id)
@pytest.mark.parametrize(
    "model_name",
    [
        pytest.param(name, id=f"{name}_b{suites.TRAIN_BATCH}", marks=benchmark_group(f"train step {name}"))
        for name in suites.TRAIN_MODELS
    ],
)
def test_train_step(benchmark, model_name, method):
    """Forward+backward of every switch; the optimizer step, the same for all, is not timed."""
    run.register_slimmable_loop(DEVICE)
    model = run.build_model(model_name, SWITCHES, DEVICE)
    images = torch.randn(suites.TRAIN_BATCH, 3, 32, 32, device=DEVICE)
    labels = torch.randint(0, 10, (suites.TRAIN_BATCH,), device=DEVICE)
    if run.method_kind(method) == "d":  # all switches in one pass, in the model's own layout
        criterion = InplaceDistillationLoss(teacher=SWITCHES.widest)
        step = lambda: run.paradis_step(model, images, labels, criterion, ARGS, True)
    else:  # one pass per switch, each layer as per-block loops: how slimmable networks train
        channels_last = method.endswith(run.NHWC)
        step = lambda: run.per_switch_step(model, images, labels, SWITCHES, ARGS, True, channels_last)
    benchmark(synchronized(step))
