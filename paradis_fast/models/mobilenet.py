"""MobileNet v1 (Howard et al. 2017) as a ParaDiS network."""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import DepthwiseConv2d, SwitchBatchNorm2d, Switchable
from ..switches import SwitchSet, SwitchSetLike
from ._common import DEFAULT_SWITCHES, conv_bn, init_weights, kept_strides, scaled

# (output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *((512, 1),) * 5, (1024, 2), (1024, 1))


def depthwise_separable(in_channels: int, out_channels: int, switches: SwitchSet, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU, then sliced pointwise 1x1 + BN + ReLU.

    The depthwise conv (an nn.Conv2d with groups = channels) needs no slicing: channel c reads only
    channel c, so the stacked switches share it and uncovered channels stay zero.
    """
    depthwise = nn.Sequential(
        DepthwiseConv2d(in_channels, 3, stride, 1),
        SwitchBatchNorm2d(in_channels, switches, activation="relu"),
    )
    return nn.Sequential(depthwise, conv_bn(in_channels, out_channels, 1, switches))


class MobileNetV1(Switchable):
    """MobileNet v1 for every switch of ``switches`` at once; see `mobilenet_v1`."""

    def __init__(
        self,
        num_classes: int = 1000,
        switches: SwitchSetLike = DEFAULT_SWITCHES,
        width_mult: float = 1.0,
        small_input: bool = False,
        in_channels: int = 3,
        input_size: int | None = None,
    ):
        super().__init__(switches)
        channels = scaled(32, width_mult)
        stem_stride, *strides = kept_strides([1 if small_input else 2, *(s for _, s in BLOCKS)], input_size)
        layers = [conv_bn(in_channels, channels, 3, self.switches, stride=stem_stride, input_shared=True)]
        for (out_channels, _), stride in zip(BLOCKS, strides):
            out_channels = scaled(out_channels, width_mult)
            layers.append(depthwise_separable(channels, out_channels, self.switches, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Uncovered features are zero, so one Linear sums the sub-networks' partial logits + bias once.
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[S, B, num_classes]``, one row per active switch."""
        features = self.avgpool(self.features(self.input_layout(x))).flatten(1)
        return self.classifier(features).unflatten(0, (len(self.active), -1))


def mobilenet_v1(
    num_classes: int = 1000,
    switches: SwitchSetLike = DEFAULT_SWITCHES,
    width_mult: float = 1.0,
    small_input: bool = False,
    in_channels: int = 3,
    input_size: int | None = None,
) -> MobileNetV1:
    """MobileNet v1: a 3x3 stride-2 stem and 13 depthwise-separable blocks (64 ... 1024 channels).

    Channel counts are ``max(8, int(c * width_mult))``. ``small_input=True`` (28-32 px images such as
    CIFAR or MNIST) makes the stem stride 1, so the last feature map is 2x2 instead of 1x1.
    ``input_size`` (the image side), when given, keeps every feature map at least 2x2 on smaller
    images such as 8x8 digits (`kept_strides`).
    """
    return MobileNetV1(num_classes, switches, width_mult, small_input, in_channels, input_size)
