"""Pieces shared by the model families: channel scaling, sliced conv + BN, initialisation."""

from __future__ import annotations

from torch import nn

from ..nn import SlicedConv2d, SwitchBatchNorm2d
from ..switches import SwitchSet

DEFAULT_SWITCHES = ("1x1.0", "2x0.5", "4x0.25")


def scaled(channels: int, width_mult: float) -> int:
    """``int(channels * width_mult)``, at least 8 so every default switch gets non-empty slices."""
    return max(8, int(channels * width_mult))


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    switches: SwitchSet,
    stride: int = 1,
    activation: str | None = "relu",
    input_shared: bool = False,
) -> nn.Sequential:
    """Sliced conv ('same' padding, no bias: BN follows) + per-switch BN with the activation fused.

    A Sequential, like torchvision's Conv2dNormActivation, so the dense twin of a model is the same
    tree of stock layers.
    """
    return nn.Sequential(
        SlicedConv2d(
            in_channels,
            out_channels,
            kernel_size,
            switches,
            stride=stride,
            padding=kernel_size // 2,
            input_shared=input_shared,
        ),
        SwitchBatchNorm2d(out_channels, switches, activation=activation),
    )


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal convs (fan_out, ReLU), N(0, 0.01) classifier.

    SwitchBatchNorm2d already starts at weight 1, bias 0.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, SlicedConv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
