"""Pieces shared by the model families: channel scaling, sliced conv + BN, initialisation."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..nn import SlicedConv2d, SwitchBatchNorm2d
from ..switches import SwitchSet

DEFAULT_SWITCHES = ("1x1.0", "2x0.5", "4x0.25")


def scaled(channels: int, width_mult: float) -> int:
    """``int(channels * width_mult)``, at least 8 so every default switch gets non-empty slices."""
    return max(8, int(channels * width_mult))


MIN_FEATURE_SIZE = 2


def kept_strides(strides: Sequence[int], input_size: int | None) -> list[int]:
    """``strides`` of a network's stages, with each stride 2 that would shrink a feature map from
    ``input_size`` below `MIN_FEATURE_SIZE` turned into 1.

    On 8-16 px images (digits) a stock schedule ends at 1x1 several stages early: the 3x3 layers
    then see a single pixel and training is several times slower (README, recipe). Images large
    enough for the stock schedule keep it exactly.
    """
    if input_size is None:
        return list(strides)
    kept = []
    for stride in strides:
        smaller = -(-input_size // stride)
        if stride > 1 and smaller < MIN_FEATURE_SIZE:
            stride, smaller = 1, input_size
        kept.append(stride)
        input_size = smaller
    return kept


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
