"""Cut one switch of a ParaDiS network into standalone per-device models of stock torch layers.

Sub-network j of a switch only touches channel slice j of every layer, so walking the model's
modules and replacing each by its slice-j twin gives device j's model: a sliced conv becomes an
``nn.Conv2d`` holding its weight block ``W[out_j, in_j]`` (``W[out_j, :]`` for the stem, which
sees the image), a switch BatchNorm is folded (its row for the switch; a universally slimmable
network's layers share one affine row, their statistics stay per switch) into the conv before it,
a depthwise conv keeps channels ``in_j``. Containers are copied with their children replaced, so
residual blocks keep their own ``forward``. The dense layer where the sub-networks meet (the
classifier, WDSR's tail conv) becomes the column block ``W[:, in_j]`` without bias: each device
returns its partial output, and `Split.fuse` sums them and adds the bias once (plus, for WDSR,
PixelShuffle and the skip branch from the image).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..models import WDSR, MobileNetV1, ResNet
from ..nn import SlicedConv2d, SwitchBatchNorm2d, Switchable
from ..switches import Switch, SwitchLike

__all__ = ["split", "Split", "Fusion", "PartStats"]

ACTIVATIONS = {None: None, "relu": nn.ReLU, "relu6": nn.ReLU6}


class Layout(NamedTuple):
    """A model family's top level: the sliced trunk (in order), the dense layer where the
    sub-networks meet, what follows it, and a branch from the image added at the end."""

    trunk: list[nn.Module]
    meet: nn.Module
    after: nn.Module | None = None
    skip: nn.Module | None = None


def _layout(model: nn.Module) -> Layout:
    if isinstance(model, MobileNetV1):
        return Layout([model.features, model.avgpool, nn.Flatten()], model.classifier)
    if isinstance(model, ResNet):
        return Layout([model.stem, model.maxpool, model.layers, model.avgpool, nn.Flatten()], model.fc)
    if isinstance(model, WDSR):
        return Layout([model.head, model.body], model.tail[0], model.tail[1], model.skip)
    raise TypeError(f"split: no layout known for {type(model).__name__}; supported: MobileNetV1, ResNet, WDSR")


def _is_sliceable_conv(module: nn.Module) -> bool:
    """A sliced conv, or a depthwise conv (channel c reads only channel c)."""
    depthwise = isinstance(module, nn.Conv2d) and 1 < module.groups == module.in_channels == module.out_channels
    return depthwise or isinstance(module, SlicedConv2d)


def _conv(weight: Tensor, bias: Tensor | None, like: nn.Module, groups: int = 1) -> nn.Conv2d:
    """A stock nn.Conv2d with `like`'s stride/padding/dilation holding the given weight and bias."""
    out_channels, in_per_group = weight.shape[:2]
    conv = nn.Conv2d(
        in_per_group * groups,
        out_channels,
        tuple(weight.shape[2:]),
        stride=like.stride,
        padding=like.padding,
        dilation=like.dilation,
        groups=groups,
        bias=bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    conv.weight.copy_(weight)
    if bias is not None:
        conv.bias.copy_(bias)
    return conv


def _plain(module: nn.Module) -> nn.Module:
    """A stock copy of a fusion-side module, weight normalisation baked into plain parameters."""
    if isinstance(module, nn.Sequential):
        return nn.Sequential(*(_plain(child) for child in module))
    if isinstance(module, nn.Conv2d):
        return _conv(module.weight, module.bias, module, module.groups)
    if [*module.parameters()]:
        raise TypeError(f"split: cannot copy {type(module).__name__} into the fusion")
    return copy.deepcopy(module)


class _Slicer:
    """Replaces the modules of one sub-network (device `j` of `switch`, BatchNorm row `row`)."""

    def __init__(self, switch: Switch, row: int, j: int):
        self.switch, self.row, self.j = switch, row, j

    def channels(self, count: int) -> slice:
        start, stop = self.switch.slices(count)[self.j]
        return slice(start, stop)

    def conv_block(self, conv: nn.Module) -> tuple[Tensor, Tensor | None, int]:
        """(weight block, bias block, groups) of a sliced or depthwise conv for this sub-network."""
        weight, bias = conv.weight, conv.bias
        out = self.channels(weight.shape[0])
        if isinstance(conv, SlicedConv2d):
            block = weight[out] if conv.input_shared else weight[out, self.channels(weight.shape[1])]
            return block, None if bias is None else bias[out], 1
        return weight[out], None if bias is None else bias[out], out.stop - out.start  # depthwise

    def fold(self, conv: nn.Module, bn: SwitchBatchNorm2d | None) -> list[nn.Module]:
        """The conv's block with `bn`'s row folded in (float64 arithmetic), then the activation."""
        weight, bias, groups = self.conv_block(conv)
        if bn is None:
            return [_conv(weight, bias, conv, groups)]
        out, row = self.channels(bn.num_features), self.row
        gamma, beta = bn.affine_row(row)  # the shared row of a universally slimmable network's layer
        scale = gamma[out].double() / (bn.running_var[row, out].double() + bn.eps).sqrt()
        shift = beta[out].double() - bn.running_mean[row, out].double() * scale
        if bias is not None:
            shift = shift + bias.double() * scale
        folded_weight = (weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype)
        folded = _conv(folded_weight, shift.to(weight.dtype), conv, groups)
        activation = ACTIVATIONS[bn.activation]
        # in place: the conv's output is dead after its activation (saves a buffer and a write)
        return [folded] if activation is None else [folded, activation(inplace=True)]

    def __call__(self, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Sequential):
            return nn.Sequential(*self.sequence(list(module)))
        if _is_sliceable_conv(module):
            return self.fold(module, None)[0]
        if isinstance(module, (SwitchBatchNorm2d, nn.Linear, nn.Conv2d, Switchable)):
            raise TypeError(
                f"split: cannot slice a {type(module).__name__} here ({module}); a switch BatchNorm must "
                "follow a conv, dense layers may only be where the sub-networks meet"
            )
        if [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            raise TypeError(f"split: {type(module).__name__} holds its own parameters or buffers and cannot be sliced")
        children = dict(module.named_children())
        if not children:
            return copy.deepcopy(module)  # ReLU, pooling, Identity, Flatten, ...
        sliced = copy.copy(module)  # a residual block: keep its forward, replace its children
        sliced._modules = {name: self(child) for name, child in children.items()}
        return sliced

    def sequence(self, modules: list[nn.Module]) -> list[nn.Module]:
        out, i = [], 0
        while i < len(modules):
            module, following = modules[i], modules[i + 1] if i + 1 < len(modules) else None
            if _is_sliceable_conv(module) and isinstance(following, SwitchBatchNorm2d):
                out += self.fold(module, following)
                i += 2
            else:
                out.append(self(module))
                i += 1
        return out

    def meet(self, layer: nn.Module) -> nn.Module:
        """The meeting layer's column block ``W[:, in_j]``, no bias: device j's partial output."""
        weight = layer.weight[:, self.channels(layer.weight.shape[1])]
        if isinstance(layer, nn.Linear):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
            linear.weight.copy_(weight)
            return linear
        if isinstance(layer, nn.Conv2d) and layer.groups == 1:
            return _conv(weight, None, layer)
        raise TypeError(f"split: the sub-networks cannot meet at {layer}; expected nn.Linear or a dense nn.Conv2d")


class Fusion(nn.Module):
    """Sum of the devices' partial outputs + the meeting layer's bias once, then what follows."""

    def __init__(self, bias: Tensor | None, after: nn.Module | None, skip: nn.Module | None):
        super().__init__()
        self.register_buffer("bias", bias)
        self.after = after if after is not None else nn.Identity()
        self.skip = skip

    def fuse(self, partials: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """The model's output from every device's partial output (the image only for a skip branch)."""
        return self(torch.stack(list(partials)).sum(0), image)

    def forward(self, total: Tensor, image: Tensor | None = None) -> Tensor:
        if self.bias is not None:
            total = total + self.bias.view(-1, *([1] * (total.dim() - 2)))
        out = self.after(total)
        if self.skip is not None:
            if image is None:
                raise ValueError("fuse: this model adds a skip branch from the image; pass image=")
            out = out + self.skip(image)
        return out


@dataclass(frozen=True)
class PartStats:
    """Parameters of the part; per image, FLOPs (2 per multiply-add of its convs and linears;
    element-wise ops not counted) and the bytes of the partial output it sends; the bytes of its
    parameters (the weights its device must hold, besides activations)."""

    params: int
    flops: int
    bytes_sent: int
    param_bytes: int


def _count_flops(module: nn.Module, image: Tensor) -> tuple[int, Tensor]:
    total = 0

    def count(layer, inputs, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += 2 * output.numel() * layer.weight[0].numel()
        elif isinstance(layer, nn.Linear):
            total += 2 * output.numel() * layer.in_features

    handles = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        output = module(image)
    finally:
        for handle in handles:
            handle.remove()
    return total, output


class Split(nn.Module):
    """Switch `switch` of a model as ``parts`` (one standalone module per device) and a `Fusion`."""

    def __init__(self, switch: Switch, parts: Sequence[nn.Module], fusion: Fusion):
        super().__init__()
        self.switch = switch
        self.parts = nn.ModuleList(parts)
        self.fusion = fusion

    def fuse(self, partials: Sequence[Tensor], image: Tensor | None = None) -> Tensor:
        """The model's output from every device's partial output (the image only for a skip branch)."""
        if len(partials) != len(self.parts):
            raise ValueError(f"fuse: switch {self.switch} has {len(self.parts)} parts, got {len(partials)} partials")
        return self.fusion.fuse(partials, image)

    def forward(self, image: Tensor) -> Tensor:
        """Every part on this process, then the fusion: the model's output for the switch."""
        return self.fuse([part(image) for part in self.parts], image)

    @torch.no_grad()
    def stats(self, image_shape: Sequence[int]) -> list[PartStats]:
        """`PartStats` of every part for one image of shape ``[C, H, W]``."""
        parameter = next(self.parts[0].parameters())
        image = torch.zeros(1, *image_shape, dtype=parameter.dtype, device=parameter.device)
        stats = []
        for part in self.parts:
            flops, output = _count_flops(part, image)
            parameters = list(part.parameters())
            stats.append(
                PartStats(
                    sum(p.numel() for p in parameters),
                    flops,
                    output.numel() * output.element_size(),
                    sum(p.numel() * p.element_size() for p in parameters),
                )
            )
        return stats


@torch.no_grad()
def split(model: Switchable, switch: SwitchLike) -> Split:
    """Cut `switch` of `model` into standalone per-device modules (inference: BatchNorm running
    statistics of the switch are folded in, whatever mode the model is in). On CPU the parts'
    weights are channels_last, like the models' activations there: oneDNN then runs every
    convolution channels_last, whatever the layout of the image, which is faster there
    (bench/README.md)."""
    switch = Switch.parse(switch)
    layout = _layout(model)
    row = model.switches.index(switch)
    parts = []
    for j in range(switch.num_devices):
        slicer = _Slicer(switch, row, j)
        part = nn.Sequential(*(slicer(module) for module in layout.trunk), slicer.meet(layout.meet)).eval()
        on_cpu = all(p.device.type == "cpu" for p in part.parameters())
        parts.append(part.to(memory_format=torch.channels_last) if on_cpu else part)
    bias = None if layout.meet.bias is None else layout.meet.bias.detach().clone()
    after = None if layout.after is None else _plain(layout.after)
    skip = None if layout.skip is None else _plain(layout.skip)
    result = Split(switch, parts, Fusion(bias, after, skip)).eval()
    return result.requires_grad_(False)
