"""The paradis op library: one op per function, its autograd in C++ (csrc/autograd.cpp), run by
eager and traced calls alike; the checks of torch.library.opcheck (schema, autograd registration,
fake kernel, AOT dispatch) on every op; outputs in x's layout; no double backward."""

from __future__ import annotations

import pytest
import torch

from paradis_fast import SwitchSet
from paradis_fast.ops import available_backends, backend_for, sliced_conv2d, switch_batch_norm, use_backend
from paradis_fast.ops.plan import conv_blocks

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("sliced_conv2d"), reason="paradis_fast._C is not built: no paradis ops"
)

SWITCHES = SwitchSet(["1x1.0", "0.5+0.25+0.25", "3x1/3"])
OPS = torch.ops.paradis


def test_public_ops_run_the_paradis_ops_eagerly_and_in_inference_mode():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(len(SWITCHES) * 2, 6, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 6, 3, 3, generator=g).requires_grad_()
    bn = [
        torch.ones(len(SWITCHES), 6, requires_grad=True),
        torch.zeros(len(SWITCHES), 6, requires_grad=True),
        torch.zeros(len(SWITCHES), 6),
        torch.ones(len(SWITCHES), 6),
    ]

    def block():
        h = sliced_conv2d(x, weight, None, SWITCHES, padding=1)
        return switch_batch_norm(h, *bn, SWITCHES, training=True, activation="relu", residual=x)

    with use_backend("cpu"), torch.profiler.profile() as prof:
        block().sum().backward()
    names = {event.name for event in prof.events()}
    ours = {name for name in names if name.startswith("paradis")}
    assert ours == {
        "paradis::sliced_conv2d",
        "paradis::sliced_conv2d_backward",
        "paradis::switch_batch_norm",
        "paradis::switch_batch_norm_backward",
        "paradis::update_running_stats_",
    }
    expected = block().detach()
    with use_backend("cpu"), torch.inference_mode():
        assert torch.equal(block(), expected)


def test_traced_calls_record_the_paradis_op_of_the_device_whatever_is_forced():
    x, weight = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 1, 1)

    def f(x, weight):
        return sliced_conv2d(x, weight, None, ["1x1.0", "2x0.5"])

    with use_backend("reference"):
        exported = torch.export.export(_Call(f), (x, weight))
        assert backend_for("sliced_conv2d", x.device).name == "reference"
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "paradis.sliced_conv2d.default" in targets
    torch.testing.assert_close(exported.module()(x, weight), f(x, weight))


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("op", ["sliced_conv2d", "switch_batch_norm", "depthwise_conv2d"])
def test_opcheck(op):
    g = torch.Generator().manual_seed(14)
    if op == "depthwise_conv2d":
        args = (
            torch.randn(2, 16, 3, 3, generator=g, requires_grad=True),
            torch.randn(16, 1, 3, 3, generator=g, requires_grad=True),
            None,
            [1, 1],
            [1, 1],
            [1, 1],
        )
    elif op == "sliced_conv2d":
        args = (
            torch.randn(6, 4, 5, 5, generator=g, requires_grad=True),
            torch.randn(5, 4, 3, 3, generator=g, requires_grad=True),
            None,
            list(conv_blocks(SWITCHES, 4, 5, False)),
            3,
            [1, 1],
            [1, 1],
            [1, 1],
            False,
        )
    else:
        args = (
            torch.randn(6, 4, 3, 3, generator=g, requires_grad=True),
            torch.randn(3, 4, generator=g, requires_grad=True),
            torch.randn(3, 4, generator=g),
            torch.zeros(3, 4),
            torch.ones(3, 4),
            [4, 2, 4],
            [0, 1, 2],
            True,
            1e-5,
            "relu",
            None,
        )
    torch.library.opcheck(getattr(OPS, op).default, args)


@pytest.mark.parametrize("op", ["sliced_conv2d", "depthwise_conv2d", "switch_batch_norm"])
def test_double_backward_is_refused_clearly(op):
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    if op == "switch_batch_norm":
        y = OPS.switch_batch_norm(
            x,
            torch.ones(1, 16, requires_grad=True),
            torch.zeros(1, 16),
            torch.zeros(1, 16),
            torch.ones(1, 16),
            [16],
            [0],
            True,
            1e-5,
            "relu",
        )[0]
    elif op == "sliced_conv2d":
        y = OPS.sliced_conv2d(
            x,
            torch.randn(16, 16, 3, 3, requires_grad=True),
            None,
            list(conv_blocks(SwitchSet(["1x1.0"]), 16, 16, False)),
            1,
            [1, 1],
            [1, 1],
            [1, 1],
            False,
        )
    else:
        y = OPS.depthwise_conv2d(x, torch.randn(16, 1, 3, 3, requires_grad=True), None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert torch.autograd.grad(y.square().sum(), x)[0].shape == x.shape


@pytest.mark.parametrize("layout_", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_outputs_and_input_gradients_in_the_layout_of_x(layout_):
    g = torch.Generator().manual_seed(16)
    x = torch.randn(6, 9, 7, 6, generator=g).contiguous(memory_format=layout_).requires_grad_()
    weight = torch.randn(10, 9, 3, 3, generator=g, requires_grad=True)
    y = OPS.sliced_conv2d(x, weight, None, list(conv_blocks(SWITCHES, 9, 10, False)), 3, [1, 1], [1, 1], [1, 1], False)
    grad_x, grad_w = torch.autograd.grad(y, [x, weight], torch.randn(y.shape, generator=g))
    assert y.is_contiguous(memory_format=layout_) and grad_x.is_contiguous(memory_format=layout_)
    assert grad_w.is_contiguous()
    z = OPS.depthwise_conv2d(x, torch.randn(9, 1, 3, 3, generator=g), None, [1, 1], [1, 1], [1, 1])
    assert z.is_contiguous(memory_format=layout_)
    assert torch.autograd.grad(z.sum(), x)[0].is_contiguous(memory_format=layout_)
