"""depthwise_conv2d — the depthwise convolution of MobileNet's blocks, with paradis_fast._C's CPU
gradient kernels where oneDNN's are slow.

A depthwise convolution needs no slicing (channel c reads only channel c, so the stacked switches
share it as they are), but oneDNN's weight gradient is 20-230x slower where the kernel is larger
than the image, the deep layers of a network fed small inputs (8x8 digits: 2x2 and 1x1 feature
maps), and its bfloat16 / float16 input gradient of strided layers 10-60x slower than the op's
kernel (bench/README.md); where oneDNN does not compute bfloat16 / float16 (CPUs without AVX-512,
oneDNN off), ATen's gradients round their partial sums to that dtype and run 2-75x slower than the
op's float32-accumulating kernels; where oneDNN does not run at all (turned off, or float64),
ATen runs one small convolution per channel, about 30x slower than the op's kernels. Small
images, strided layers and CPU tensors other than float32 on oneDNN therefore run through the
op, which chooses per gradient; other layers are plain F.conv2d and skip the op's overhead. The
forward is ATen's, except where oneDNN does not compute the dtype and in bfloat16 / float16
outputs of at most 4 pixels (csrc/cpu/depthwise_conv2d.h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, layout, library
from .backends import backend_for
from .plan import conv_output_size

OP = "depthwise_conv2d"
# Output images of at most this many pixels run through the op (see above), as do strided layers
# and CPU tensors off oneDNN's float32.
SMALL_IMAGE_PIXELS = 16


@torch.compiler.assume_constant_result  # dynamo does not trace torch.backends
def _onednn_runs() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _cpu_off_onednn_float32(x: Tensor) -> bool:
    return x.device.type == "cpu" and (x.dtype != torch.float32 or not _onednn_runs())


@library.register_fake(OP)
def _(x, weight, bias, stride, padding, dilation):
    out_hw = [
        conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    ]
    return layout.empty((x.shape[0], x.shape[1], *out_hw), x)


@library.register_fake(f"{OP}_backward")
def _(grad_y, x, weight, stride, padding, dilation, output_mask):
    return library.convolution_grads_like(x, weight, output_mask)


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` for x ``[N, C, H, W]`` and
    weight ``[C, 1, kh, kw]``: on small images and strided layers through the backend serving the op
    (on CPU the paradis op, with paradis_fast's gradient kernels); F.conv2d itself otherwise."""
    checks.tensors(OP, x=x, weight=weight, bias=bias)
    if not checks.autocast_unifies(x, weight, bias):
        checks.same_dtype(OP, x=x, weight=weight, bias=bias)
    checks.rank(OP, "x", x, 4, "4-D [N, C, H, W]")
    checks.rank(OP, "weight", weight, 4, "4-D [C, 1, kh, kw]")
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(
            f"{OP}: weight must be [C, 1, kh, kw] with C = {channels} (x's channels), got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{OP}: bias must have shape ({channels},), got {tuple(bias.shape)}")
    stride, padding = checks.pair(OP, "stride", stride, 1), checks.pair(OP, "padding", padding, 0)
    dilation = checks.pair(OP, "dilation", dilation, 1)
    out_hw = [
        conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    ]
    if min(out_hw) < 1:
        raise ValueError(f"{OP}: input of spatial size {tuple(x.shape[2:])} is smaller than the kernel")
    if out_hw[0] * out_hw[1] > SMALL_IMAGE_PIXELS and stride == [1, 1] and not _cpu_off_onednn_float32(x):
        return F.conv2d(x, weight, bias, stride, padding, dilation, channels)
    return backend_for(OP, x.device).function(OP)(x, weight, bias, stride, padding, dilation)
