"""WDSR-A and WDSR-B super-resolution networks (Yu et al. 2018) as ParaDiS networks.

As in the paper: weight normalisation instead of BatchNorm, PyTorch's default conv initialisation,
wide activations inside the residual blocks, and a global skip branch from the image. One
departure: the skip branch starts as bicubic upscaling instead of random, so every switch starts
at the bicubic baseline and the body learns the residual detail; on small training budgets the
random skip otherwise spends most of the run learning interpolation. Inputs are expected already
normalised (the paper subtracts the dataset mean outside the body).
"""

from __future__ import annotations

from typing import Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..nn import SlicedConv2d, Switchable
from ..switches import SwitchSet, SwitchSetLike
from ._common import DEFAULT_SWITCHES


def _sliced(
    in_channels: int, out_channels: int, kernel_size: int, switches: SwitchSet, input_shared: bool = False
) -> nn.Module:
    """Weight-normalised sliced conv with bias and 'same' padding."""
    return weight_norm(
        SlicedConv2d(
            in_channels,
            out_channels,
            kernel_size,
            switches,
            padding=kernel_size // 2,
            bias=True,
            input_shared=input_shared,
        )
    )


def _plain(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    """Weight-normalised plain conv: run on the stacked tensor it sums the sub-networks' partial
    outputs (plus the bias once), which is how the devices' results fuse."""
    return weight_norm(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2))


def _bicubic_skip(in_channels: int, scale: int) -> nn.Module:
    """5x5 conv + PixelShuffle computing ``F.interpolate(x, scale_factor=scale, mode="bicubic")``
    away from the border (bicubic's 4 taps sit within +-2 pixels of every output phase for any
    scale); weight-normalised and trainable like the paper's skip branch."""
    conv = nn.Conv2d(in_channels, in_channels * scale**2, 5, padding=2)
    with torch.no_grad():
        conv.weight.copy_(_bicubic_weight(in_channels, scale))
        conv.bias.zero_()
    return nn.Sequential(weight_norm(conv), nn.PixelShuffle(scale))


def _bicubic_weight(in_channels: int, scale: int) -> Tensor:
    """Conv weight whose output channel ``c*scale^2 + py*scale + px`` is phase (py, px) of channel
    c's bicubic upscaling: the 1-D taps read off the upscaled unit impulse, as an outer product."""
    n, centre = 16, 8
    impulse = torch.zeros(1, 1, 1, n, dtype=torch.float64)
    impulse[..., centre] = 1
    line = F.interpolate(impulse, scale_factor=(1, scale), mode="bicubic", align_corners=False).flatten()
    # output x[i] = sum_k w[k] * input[i + k - 2]; the impulse at `centre` is tap k = centre - i + 2
    taps = torch.stack([line[scale * (centre - torch.arange(5) + 2) + p] for p in range(scale)])  # [phase, 5]
    phases = (taps[:, None, :, None] * taps[None, :, None, :]).flatten(0, 1)  # [scale^2, 5, 5]
    weight = torch.zeros(in_channels, scale**2, in_channels, 5, 5, dtype=torch.float64)
    for c in range(in_channels):
        weight[c, :, c] = phases
    return weight.flatten(0, 1).float()


class _Residual(nn.Module):
    """``x + res_scale * body(x)``."""

    def __init__(self, body: nn.Sequential, res_scale: float):
        super().__init__()
        self.body, self.res_scale = body, res_scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) * self.res_scale


class WDSRBlockA(_Residual):
    """WDSR-A: 3x3 expand to ``block_feats``, ReLU, 3x3 back to ``n_feats``."""

    def __init__(self, n_feats: int, switches: SwitchSet, block_feats: int, res_scale: float = 1.0):
        super().__init__(
            nn.Sequential(
                _sliced(n_feats, block_feats, 3, switches),
                nn.ReLU(inplace=True),
                _sliced(block_feats, n_feats, 3, switches),
            ),
            res_scale,
        )


class WDSRBlockB(_Residual):
    """WDSR-B: 1x1 expand, ReLU, 1x1 low-rank projection, 3x3 back to ``n_feats`` (wider ReLU, same cost)."""

    def __init__(
        self, n_feats: int, switches: SwitchSet, block_feats: int, low_rank_feats: int, res_scale: float = 1.0
    ):
        super().__init__(
            nn.Sequential(
                _sliced(n_feats, block_feats, 1, switches),
                nn.ReLU(inplace=True),
                _sliced(block_feats, low_rank_feats, 1, switches),
                _sliced(low_rank_feats, n_feats, 3, switches),
            ),
            res_scale,
        )


class WDSR(Switchable):
    """WDSR for every switch of ``switches`` at once: sliced head and body, then a plain tail conv +
    PixelShuffle, plus a skip branch computed once from the image and shared by every switch."""

    def __init__(
        self,
        block: Type[Union[WDSRBlockA, WDSRBlockB]],
        n_blocks: int,
        scale: int,
        switches: SwitchSetLike,
        n_feats: int,
        in_channels: int = 3,
        **block_args,
    ):
        super().__init__(switches)
        out_channels = in_channels * scale**2
        self.head = _sliced(in_channels, n_feats, 3, self.switches, input_shared=True)
        self.body = nn.Sequential(*(block(n_feats, self.switches, **block_args) for _ in range(n_blocks)))
        self.tail = nn.Sequential(_plain(n_feats, out_channels, 3), nn.PixelShuffle(scale))
        self.skip = _bicubic_skip(in_channels, scale)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> ``[S, B, C, H*scale, W*scale]``, one row per active switch."""
        x = self.input_layout(x)
        y = self.tail(self.body(self.head(x)))
        return y.unflatten(0, (len(self.active), -1)) + self.skip(x)


def wdsr_a(
    scale: int = 2,
    switches: SwitchSetLike = DEFAULT_SWITCHES,
    n_feats: int = 32,
    block_feats: int = 128,
    n_blocks: int = 8,
    res_scale: float = 1.0,
    in_channels: int = 3,
) -> WDSR:
    """WDSR-A: ``n_blocks`` wide-activation blocks of 3x3 convs (``n_feats`` -> ``block_feats`` -> ``n_feats``)."""
    return WDSR(
        WDSRBlockA, n_blocks, scale, switches, n_feats, in_channels, block_feats=block_feats, res_scale=res_scale
    )


def wdsr_b(
    scale: int = 2,
    switches: SwitchSetLike = DEFAULT_SWITCHES,
    n_feats: int = 32,
    block_feats: int = 128,
    n_blocks: int = 8,
    low_rank_feats: int | None = None,
    res_scale: float = 1.0,
    in_channels: int = 3,
) -> WDSR:
    """WDSR-B: ``n_blocks`` blocks with a 1x1 expansion to ``block_feats`` and a 1x1 low-rank
    projection to ``low_rank_feats`` (default ``int(n_feats * 0.8)``, the paper's ratio) before the 3x3."""
    low_rank_feats = int(n_feats * 0.8) if low_rank_feats is None else low_rank_feats
    return WDSR(
        WDSRBlockB,
        n_blocks,
        scale,
        switches,
        n_feats,
        in_channels,
        block_feats=block_feats,
        low_rank_feats=low_rank_feats,
        res_scale=res_scale,
    )
