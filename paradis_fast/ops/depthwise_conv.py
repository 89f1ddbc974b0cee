"""paradis::depthwise_conv2d — the depthwise convolution of MobileNet's blocks, with the CPU
weight gradient of paradis_fast._C on small images.

A depthwise convolution needs no slicing (channel c reads only channel c, so the stacked switches
share it as they are), but oneDNN's backward is slow on images of a few pixels, the deep layers of a
network fed small inputs (8x8 digits: 1x1 and 2x2 feature maps): [192, 1024, 2, 2] 5.7 ms against
0.85 ms with paradis_C's weight gradient, [192, 512, 1, 1] 1.1 against 0.14. From 4x4 up oneDNN is as
fast (bench/README.md), so there the op is plain F.conv2d and skips the custom op's overhead. The
forward and the input gradient are always ATen's.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, layout, native
from .backends import forced_backend
from .plan import conv_output_size

OP = "depthwise_conv2d"
# Output images of at most this many pixels run through the op (see above).
SMALL_IMAGE_PIXELS = 16


@torch.library.custom_op("paradis::depthwise_conv2d", mutates_args=())
def _depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                      dilation: List[int]) -> Tensor:
    return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])


@_depthwise_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation):
    out_hw = [conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)]
    return layout.empty((x.shape[0], x.shape[1], *out_hw), x)


@torch.library.custom_op("paradis::depthwise_conv2d_backward", mutates_args=())
def _depthwise_conv2d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                               dilation: List[int], output_mask: List[bool]) -> List[Tensor]:
    grad_y = grad_y.contiguous(memory_format=layout.memory_format(x))
    if _cpu_backend_serves(x.device.type):
        grads = torch.ops.paradis_C.depthwise_conv2d_backward(grad_y, x, weight, stride, padding, dilation, output_mask)
    else:  # reached under torch.compile only, which routes without reading the backend setting
        grads = torch.ops.aten.convolution_backward(grad_y, x, weight, [x.shape[1]], stride, padding, dilation, False,
                                                    [0, 0], x.shape[1], output_mask)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_depthwise_conv2d_backward.register_fake
def _(grad_y, x, weight, stride, padding, dilation, output_mask):
    shapes = [x.shape, weight.shape, weight.shape[:1]]
    return [layout.empty(shapes[0], x) if output_mask[0] else x.new_empty(0)] + [
        x.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes[1:], output_mask[1:])]


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.config = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = _depthwise_conv2d_backward(grad_y, x, weight, *ctx.config, mask)
    grad_x, grad_w, grad_b = (g if needed else None for g, needed in zip(grads, mask))
    return grad_x, grad_w, grad_b, None, None, None


_depthwise_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _runs_native(device: torch.device, out_pixels: int) -> bool:
    """Whether the call goes through the op: a small image on CPU, where the cpu backend serves it.
    torch.compile cannot trace the backend setting (a ContextVar): there the op's backward checks."""
    if out_pixels > SMALL_IMAGE_PIXELS or device.type != "cpu":
        return False
    return torch.compiler.is_compiling() or _cpu_backend_serves(device.type)


def _cpu_backend_serves(device_type: str) -> bool:
    """The cpu backend is chosen (automatically or forced) and built; other backends have no kernel
    of their own for this op."""
    return forced_backend() in (None, "cpu") and native.cpu.unavailable_reason(OP, torch.device(device_type)) is None


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                     dilation=1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` for x ``[N, C, H, W]`` and
    weight ``[C, 1, kh, kw]``: on CPU and small images through the paradis op (its weight gradient
    is paradis_fast's kernel); otherwise, or under a backend with no kernel for it, F.conv2d itself."""
    checks.tensors(OP, x=x, weight=weight, bias=bias)
    checks.same_dtype(OP, x=x, weight=weight, bias=bias)
    checks.rank(OP, "x", x, 4, "4-D [N, C, H, W]")
    checks.rank(OP, "weight", weight, 4, "4-D [C, 1, kh, kw]")
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(f"{OP}: weight must be [C, 1, kh, kw] with C = {channels} (x's channels), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{OP}: bias must have shape ({channels},), got {tuple(bias.shape)}")
    stride, padding = checks.pair(OP, "stride", stride, 1), checks.pair(OP, "padding", padding, 0)
    dilation = checks.pair(OP, "dilation", dilation, 1)
    out_hw = [conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)]
    if min(out_hw) < 1:
        raise ValueError(f"{OP}: input of spatial size {tuple(x.shape[2:])} is smaller than the kernel")
    if not _runs_native(x.device, out_hw[0] * out_hw[1]):
        return F.conv2d(x, weight, bias, stride, padding, dilation, channels)
    op = layout.eager_autograd_op(OP, x) or _depthwise_conv2d
    return op(x, weight, bias, stride, padding, dilation)
