"""ResNets (He et al. 2016) as ParaDiS networks: ResNet-50 and the CIFAR-style ResNet-20."""

from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import Tensor, nn

from ..nn import Switchable, SwitchBatchNorm2d
from ..switches import SwitchSet, SwitchSetLike
from ._common import DEFAULT_SWITCHES, conv_bn, init_weights, kept_strides, scaled


def _shortcut(in_planes: int, out_planes: int, switches: SwitchSet, stride: int) -> nn.Module:
    """Identity, or a sliced 1x1 conv + BN where the shape changes (projection shortcut)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return conv_bn(in_planes, out_planes, 1, switches, stride, activation=None)


def _add_relu(conv_bn: nn.Sequential, h: Tensor, shortcut: Tensor) -> Tensor:
    """relu(conv_bn(h) + shortcut). With a switch BatchNorm, the addition and the ReLU happen in its
    kernel's pass (SwitchBatchNorm2d.add_activate); in a deployed part (stock layers, BN folded
    into the conv) in place on the conv's fresh output (bench/README.md)."""
    bn = conv_bn[-1]
    if isinstance(bn, SwitchBatchNorm2d):
        return bn.add_activate(conv_bn[0](h), shortcut, "relu")
    return torch.relu_(conv_bn(h).add_(shortcut))


class BasicBlock(nn.Module):
    """Two 3x3 convs; ReLU after the residual addition."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, switches: SwitchSet, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(in_planes, planes, 3, switches, stride)
        self.conv2 = conv_bn(planes, planes, 3, switches, activation=None)
        self.shortcut = _shortcut(in_planes, planes, switches, stride)

    def forward(self, x: Tensor) -> Tensor:
        return _add_relu(self.conv2, self.conv1(x), self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's ResNet v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, switches: SwitchSet, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(in_planes, planes, 1, switches)
        self.conv2 = conv_bn(planes, planes, 3, switches, stride)
        self.conv3 = conv_bn(planes, planes * self.expansion, 1, switches, activation=None)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, switches, stride)

    def forward(self, x: Tensor) -> Tensor:
        return _add_relu(self.conv3, self.conv2(self.conv1(x)), self.shortcut(x))


class ResNet(Switchable):
    """A ResNet for every switch of ``switches`` at once.

    ``large_stem``: 7x7 stride-2 conv + 3x3 stride-2 max pool (ImageNet); else a 3x3 stride-1 conv
    (28-32 px images). Stage i has ``blocks[i]`` blocks of ``planes[i]`` planes; every stage after
    the first halves the resolution (unless ``input_size`` is so small that a feature map would
    shrink below 2x2: `kept_strides`).
    """

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        blocks: Sequence[int],
        planes: Sequence[int],
        stem_channels: int,
        large_stem: bool,
        num_classes: int,
        switches: SwitchSetLike,
        in_channels: int = 3,
        input_size: int | None = None,
    ):
        super().__init__(switches)
        if large_stem:
            self.stem = conv_bn(in_channels, stem_channels, 7, self.switches, stride=2, input_shared=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.stem = conv_bn(in_channels, stem_channels, 3, self.switches, input_shared=True)
            self.maxpool = nn.Identity()
        stages, in_planes = [], stem_channels
        stem_size = None if input_size is None else -(-input_size // 4) if large_stem else input_size
        stage_strides = kept_strides([1] + [2] * (len(blocks) - 1), stem_size)
        for count, width, stage_stride in zip(blocks, planes, stage_strides):
            stage = []
            for j in range(count):
                stage.append(block(in_planes, width, self.switches, stride=stage_stride if j == 0 else 1))
                in_planes = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # Uncovered features are zero, so one Linear sums the sub-networks' partial logits + bias once.
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[S, B, num_classes]``, one row per active switch."""
        features = self.avgpool(self.layers(self.maxpool(self.stem(self.input_layout(x))))).flatten(1)
        return self.fc(features).unflatten(0, (len(self.active), -1))


def resnet50(
    num_classes: int = 1000,
    switches: SwitchSetLike = DEFAULT_SWITCHES,
    width_mult: float = 1.0,
    small_input: bool = False,
    in_channels: int = 3,
    input_size: int | None = None,
) -> ResNet:
    """ResNet-50: Bottleneck blocks [3, 4, 6, 3], planes 64/128/256/512 (times ``width_mult``).

    ``small_input=True`` (28-32 px images): 3x3 stride-1 stem and no max pool. ``input_size``: see
    `ResNet`.
    """
    planes = [scaled(p, width_mult) for p in (64, 128, 256, 512)]
    stem = scaled(64, width_mult)
    return ResNet(
        Bottleneck, (3, 4, 6, 3), planes, stem, not small_input, num_classes, switches, in_channels, input_size
    )


def resnet20(
    num_classes: int = 10,
    switches: SwitchSetLike = DEFAULT_SWITCHES,
    width_mult: float = 1.0,
    in_channels: int = 3,
    input_size: int | None = None,
) -> ResNet:
    """CIFAR ResNet-20: 3x3 stem, 3 stages of 3 BasicBlocks with 16/32/64 planes (times ``width_mult``),
    projection (1x1 conv + BN) shortcuts where the shape changes. ``input_size``: see `ResNet`."""
    planes = [scaled(p, width_mult) for p in (16, 32, 64)]
    return ResNet(BasicBlock, (3, 3, 3), planes, planes[0], False, num_classes, switches, in_channels, input_size)
