"""The convolutions of ParaDiS networks: SlicedConv2d (one full-width weight shared by every
switch's sub-networks) and DepthwiseConv2d (shared by the stacked switches as it is)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .. import ops
from ..switches import SwitchSetLike
from .switchable import Switchable


class SlicedConv2d(Switchable):
    """Conv2d whose sub-network j of each switch uses only ``weight[out_j, in_j]``.

    Input ``[S*B, C_in, H, W]`` stacked switch-major (``[B, C_in, H, W]`` with ``input_shared``,
    for the stem that sees the image); output ``[S*B, C_out, H', W']``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        switches: SwitchSetLike,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = False,
        input_shared: bool = False,
    ):
        super().__init__(switches)
        layer = f"SlicedConv2d({in_channels}, {out_channels})"
        self.check_slices(out_channels, f"{layer} output")
        if not input_shared:
            self.check_slices(in_channels, f"{layer} input")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.input_shared = input_shared
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation of the full-width weight."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sliced_conv2d(
            x, self.weight, self.bias, self.active, self.stride, self.padding, self.dilation, self.input_shared
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )
        if self.input_shared:
            text += ", input_shared=True"
        return f"{text}, switches=[{self.active}]"


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, groups=channels)`` running `ops.depthwise_conv2d`:
    the same module (parameters, state dict, deployment as a stock layer), with paradis_fast's CPU
    weight gradient. Channel c reads only channel c, so the stacked switches need no slicing and
    channels a switch does not cover stay zero."""

    def __init__(self, channels: int, kernel_size=3, stride=1, padding=1, dilation=1, bias: bool = False):
        super().__init__(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
