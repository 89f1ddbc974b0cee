"""The eager path of the native CPU backend: paradis_C::sliced_conv2d, switch_batch_norm and
depthwise_conv2d, the ops with their autograd in C++ (csrc/autograd.cpp), serve eager calls of the
public ops instead of the paradis:: custom ops (torch.library, Python), with the same kernels and so
the same bits; tracing keeps the custom ops."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from paradis_fast import SwitchSet
from paradis_fast.ops import available_backends, layout, sliced_conv2d, switch_batch_norm, use_backend
from paradis_fast.ops.plan import conv_blocks, covered_channels

pytestmark = pytest.mark.skipif("cpu" not in available_backends("sliced_conv2d"),
                                reason="paradis_fast._C is not built: no C++ ops")

SWITCHES = SwitchSet(["1x1.0", "0.5+0.25+0.25", "3x1/3"])
C_OPS, PY_OPS = torch.ops.paradis_C, torch.ops.paradis


def _leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


def _run(op, inputs, grad_y):
    """op(*inputs)'s first output and the gradients of the inputs that require one."""
    out = op(*inputs)
    y = out[0] if isinstance(out, (tuple, list)) else out
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)] if leaves else [y.detach()]


@pytest.mark.parametrize("layout_", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kernel, stride, with_bias, grads", [(3, 1, True, (True, True, True)), (1, 2, False, (True, True)),
                                                              (3, 2, True, (False, True, True)), (1, 1, True, (True, False, False))],
                         ids=["3x3", "1x1-s2-no-bias", "weight-only", "x-only"])
def test_conv_cpp_autograd_gives_the_custom_ops_bits(layout_, kernel, stride, with_bias, grads):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(len(SWITCHES) * 2, 9, 7, 6, generator=g).contiguous(memory_format=layout_)
    weight, bias = torch.randn(10, 9, kernel, kernel, generator=g), torch.randn(10, generator=g)
    args = (list(conv_blocks(SWITCHES, 9, 10, False)), len(SWITCHES), [stride] * 2, [kernel // 2] * 2, [1, 1], False)
    grad_y = torch.randn(C_OPS.sliced_conv2d_forward(x, weight, None, *args).shape, generator=g)
    needs = list(grads) + [False] * (3 - len(grads))
    inputs = [_leaf(x, needs[0]), _leaf(weight, needs[1]), _leaf(bias, needs[2]) if with_bias else None, *args]
    ours, theirs = _run(C_OPS.sliced_conv2d, inputs, grad_y), _run(PY_OPS.sliced_conv2d, inputs, grad_y)
    assert len(ours) == len(theirs) == 1 + sum(needs[:2]) + (needs[2] and with_bias)
    for got, want in zip(ours, theirs):
        assert torch.equal(got, want)
    assert ours[0].is_contiguous(memory_format=layout_)
    assert not needs[0] or ours[1].is_contiguous(memory_format=layout_)


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("with_residual, training", [(False, True), (True, True), (True, False)],
                         ids=["plain", "residual", "residual-eval"])
def test_bn_cpp_autograd_gives_the_custom_ops_bits(activation, with_residual, training):
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(len(SWITCHES) * 4, 9, 5, 3, generator=g) * 3).contiguous(memory_format=torch.channels_last)
    params = [torch.randn(len(SWITCHES), 9, generator=g) for _ in range(2)]
    stats = [torch.randn(len(SWITCHES), 9, generator=g), torch.rand(len(SWITCHES), 9, generator=g) + 0.5]
    residual = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last) * 3
    config = (list(covered_channels(SWITCHES, 9)), [0, 1, 2], training, 1e-5, activation)
    inputs = [_leaf(x), *map(_leaf, params), *stats, *config, _leaf(residual) if with_residual else None]
    grad_y = torch.randn(x.shape, generator=g)
    ours, theirs = _run(C_OPS.switch_batch_norm, inputs, grad_y), _run(PY_OPS.switch_batch_norm, inputs, grad_y)
    assert len(ours) == len(theirs) == 4 + with_residual
    for got, want in zip(ours, theirs):
        assert torch.equal(got, want)
    mean, var = C_OPS.switch_batch_norm(*inputs)[1:]
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("layout_", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride, with_bias", [(1, True), (2, False)])
def test_depthwise_cpp_autograd_gives_the_custom_ops_bits(layout_, stride, with_bias):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(6, 32, 5, 4, generator=g).contiguous(memory_format=layout_)
    weight, bias = torch.randn(32, 1, 3, 3, generator=g), torch.randn(32, generator=g)
    args = ([stride] * 2, [1, 1], [1, 1])
    grad_y = torch.randn(C_OPS.depthwise_conv2d(x, weight, None, *args).shape, generator=g)
    inputs = [_leaf(x), _leaf(weight), _leaf(bias) if with_bias else None, *args]
    ours, theirs = _run(C_OPS.depthwise_conv2d, inputs, grad_y), _run(PY_OPS.depthwise_conv2d, inputs, grad_y)
    assert len(ours) == len(theirs) == 3 + with_bias
    for got, want in zip(ours, theirs):
        assert torch.equal(got, want)
    assert ours[0].is_contiguous(memory_format=layout_) and ours[1].is_contiguous(memory_format=layout_)


def test_public_ops_run_the_cpp_ops_eagerly_and_in_inference_mode():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(len(SWITCHES) * 2, 6, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 6, 3, 3, generator=g).requires_grad_()
    bn = [torch.ones(len(SWITCHES), 6, requires_grad=True), torch.zeros(len(SWITCHES), 6, requires_grad=True),
          torch.zeros(len(SWITCHES), 6), torch.ones(len(SWITCHES), 6)]

    def block():
        h = sliced_conv2d(x, weight, None, SWITCHES, padding=1)
        return switch_batch_norm(h, *bn, SWITCHES, training=True, activation="relu", residual=x)

    with use_backend("cpu"), torch.profiler.profile() as prof:
        block().sum().backward()
    names = {event.name for event in prof.events()}
    assert {"paradis_C::sliced_conv2d", "paradis_C::switch_batch_norm"} <= names
    assert not {"paradis::sliced_conv2d", "paradis::switch_batch_norm"} & names
    expected = block().detach()
    with use_backend("cpu"), torch.inference_mode():
        assert torch.equal(block(), expected)


def test_tracing_and_other_backends_keep_the_custom_ops():
    x = torch.randn(2, 3, 4, 4)
    assert layout.eager_autograd_op("sliced_conv2d", x) is C_OPS.sliced_conv2d
    with FakeTensorMode() as mode:
        assert layout.eager_autograd_op("sliced_conv2d", mode.from_tensor(x)) is None
    with use_backend("reference"):
        assert layout.eager_autograd_op("sliced_conv2d", x) is None
    assert layout.eager_autograd_op("no_such_op", x) is None


@pytest.mark.parametrize("op", ["sliced_conv2d", "switch_batch_norm", "depthwise_conv2d"])
def test_cpp_ops_schema_and_autograd_registration(op):
    g = torch.Generator().manual_seed(14)
    if op == "depthwise_conv2d":
        args = (torch.randn(2, 16, 3, 3, generator=g, requires_grad=True),
                torch.randn(16, 1, 3, 3, generator=g, requires_grad=True), None, [1, 1], [1, 1], [1, 1])
    elif op == "sliced_conv2d":
        args = (torch.randn(6, 4, 5, 5, generator=g, requires_grad=True), torch.randn(5, 4, 3, 3, generator=g, requires_grad=True),
                None, list(conv_blocks(SWITCHES, 4, 5, False)), 3, [1, 1], [1, 1], [1, 1], False)
    else:
        args = (torch.randn(6, 4, 3, 3, generator=g, requires_grad=True), torch.randn(3, 4, generator=g, requires_grad=True),
                torch.randn(3, 4, generator=g), torch.zeros(3, 4), torch.ones(3, 4), [4, 2, 4], [0, 1, 2], True, 1e-5,
                "relu", None)
    torch.library.opcheck(getattr(C_OPS, op), args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("op", ["sliced_conv2d", "depthwise_conv2d", "switch_batch_norm"])
def test_double_backward_is_refused_clearly(op):
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    if op == "switch_batch_norm":
        y = C_OPS.switch_batch_norm(x, torch.ones(1, 16, requires_grad=True), torch.zeros(1, 16), torch.zeros(1, 16),
                                    torch.ones(1, 16), [16], [0], True, 1e-5, "relu")[0]
    elif op == "sliced_conv2d":
        y = C_OPS.sliced_conv2d(x, torch.randn(16, 16, 3, 3, requires_grad=True), None,
                                list(conv_blocks(SwitchSet(["1x1.0"]), 16, 16, False)), 1, [1, 1], [1, 1], [1, 1], False)
    else:
        y = C_OPS.depthwise_conv2d(x, torch.randn(16, 1, 3, 3, requires_grad=True), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert torch.autograd.grad(y.square().sum(), x)[0].shape == x.shape
