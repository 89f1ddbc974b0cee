"""paradis::sliced_conv2d — every (switch, sub-network) block of a layer in one op (DESIGN §3)."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import checks, layout
from .plan import conv_blocks, conv_output_size
from ..switches import SwitchSetLike

OP = "sliced_conv2d"


@torch.library.custom_op("paradis::sliced_conv2d", mutates_args=())
def _sliced_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], blocks: List[int], num_switches: int,
    stride: List[int], padding: List[int], dilation: List[int], input_shared: bool,
) -> Tensor:
    return layout.run(OP, "sliced_conv2d_forward", [x], weight, bias, blocks, num_switches, stride, padding,
                      dilation, input_shared)


@_sliced_conv2d.register_fake
def _(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared):
    rows = x.shape[0] * num_switches if input_shared else x.shape[0]
    out_hw = [conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)]
    return layout.empty((rows, weight.shape[0], *out_hw), x)


@torch.library.custom_op("paradis::sliced_conv2d_backward", mutates_args=())
def _sliced_conv2d_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, blocks: List[int], num_switches: int, stride: List[int],
    padding: List[int], dilation: List[int], input_shared: bool, output_mask: List[bool],
) -> List[Tensor]:
    grads = layout.run(OP, "sliced_conv2d_backward", [grad_y, x], weight, blocks, num_switches, stride, padding,
                       dilation, input_shared, output_mask)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_sliced_conv2d_backward.register_fake
def _(grad_y, x, weight, blocks, num_switches, stride, padding, dilation, input_shared, output_mask):
    grad_x = layout.empty(x.shape if output_mask[0] else (0,), x)
    shapes = [weight.shape, weight.shape[:1]]  # the weight gradients are contiguous whatever the weight's layout
    return [grad_x] + [x.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, output_mask[1:])]


def _setup_context(ctx, inputs, output):
    x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared = inputs
    ctx.save_for_backward(x, weight)
    ctx.config = (blocks, num_switches, stride, padding, dilation, input_shared)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = _sliced_conv2d_backward(grad_y, x, weight, *ctx.config, mask)
    grad_x, grad_w, grad_b = (g if needed else None for g, needed in zip(grads, mask))
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


_sliced_conv2d.register_autograd(_backward, setup_context=_setup_context)


def sliced_conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, switches: SwitchSetLike,
    stride=1, padding=0, dilation=1, input_shared: bool = False,
) -> Tensor:
    """Sliced convolution of every switch at once: for switch s and sub-network j,
    ``y[s][:, out_j] = conv2d(x[s][:, in_j], weight[out_j, in_j]) + bias[out_j]``, zero elsewhere.

    x is ``[S*B, C_in, H, W]`` stacked switch-major, or ``[B, C_in, H, W]`` with ``input_shared``
    (the stem: every sub-network reads all input channels). Returns ``[S*B, C_out, H', W']``.
    """
    switches = checks.switch_set(switches)
    checks.tensors(OP, x=x, weight=weight, bias=bias)
    checks.same_dtype(OP, x=x, weight=weight, bias=bias)
    checks.rank(OP, "x", x, 4, "4-D [S*B, C_in, H, W]")
    checks.rank(OP, "weight", weight, 4, "4-D [C_out, C_in, kh, kw]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP}: x has {x.shape[1]} channels but weight expects {weight.shape[1]} (channel mismatch)")
    stride, padding = checks.pair(OP, "stride", stride, 1), checks.pair(OP, "padding", padding, 0)
    dilation = checks.pair(OP, "dilation", dilation, 1)
    if not input_shared:
        checks.batch_divisible(OP, x.shape[0], len(switches))
    for d in range(2):
        if conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) < 1:
            raise ValueError(f"{OP}: input of spatial size {tuple(x.shape[2:])} is smaller than the kernel")
    blocks = conv_blocks(switches, weight.shape[1], weight.shape[0], bool(input_shared))
    op = layout.eager_autograd_op(OP, x) or _sliced_conv2d
    return op(x, weight, bias, list(blocks), len(switches), stride, padding, dilation, bool(input_shared))
