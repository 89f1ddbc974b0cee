"""The plain-PyTorch ways to run every switch of a layer, the baselines of bench/run.py.

- `loop_conv` / `loop_bn_relu`: what a slimmable-networks implementation does, per switch and
  sub-network F.conv2d on weight slices and torch.cat; per switch F.batch_norm + ReLU (a);
- `grouped_conv` (equal widths: native grouped convolution on the cat of the diagonal weight
  blocks) and `masked_conv` (block-masked dense convolution), `stacked_bn_relu` (one F.batch_norm
  over the switches stacked as channels): the best single-call alternatives (b);
- `grouped_mm_conv1x1`: torch._grouped_mm per switch for 1x1 convolutions (CUDA, bf16);
- `SlimmableLoop`: the per-switch loops as a paradis backend, so the training-step baseline runs
  the same model code one switch at a time with ATen's own BatchNorm kernels.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from paradis_fast import SwitchSet
from paradis_fast.ops import reference
from paradis_fast.ops.plan import conv_blocks, covered_channels, iter_blocks

Block = Tuple[int, int, int, int]  # (in_start, in_stop, out_start, out_stop)


def blocks_by_switch(switches: SwitchSet, c_in: int, c_out: int, input_shared: bool = False) -> List[List[Block]]:
    table = [[] for _ in switches]
    for s, i0, i1, o0, o1 in iter_blocks(conv_blocks(switches, c_in, c_out, input_shared)):
        table[s].append((i0, i1, o0, o1))
    return table


def _pad_channels(y: torch.Tensor, channels: int) -> torch.Tensor:
    return y if y.shape[1] == channels else F.pad(y, (0, 0, 0, 0, 0, channels - y.shape[1]))


def _rows(x: torch.Tensor, s: int, batch: int) -> torch.Tensor:
    return x[s * batch : (s + 1) * batch]


def loop_conv(x, weight, blocks: Sequence[Sequence[Block]], stride, padding):
    """(a) per switch and sub-network F.conv2d on weight slices, torch.cat."""
    batch = x.shape[0] // len(blocks)
    outputs = []
    for s, switch_blocks in enumerate(blocks):
        xs = _rows(x, s, batch)
        parts = [
            F.conv2d(xs[:, i0:i1], weight[o0:o1, i0:i1], None, stride, padding) for i0, i1, o0, o1 in switch_blocks
        ]
        outputs.append(_pad_channels(torch.cat(parts, 1), weight.shape[0]))
    return torch.cat(outputs)


def equal_widths(switch_blocks: Sequence[Block]) -> bool:
    shapes = {(i1 - i0, o1 - o0) for i0, i1, o0, o1 in switch_blocks}
    return len(shapes) == 1 and switch_blocks[0][0] == 0 and switch_blocks[0][2] == 0


def grouped_conv(x, weight, blocks: Sequence[Sequence[Block]], stride, padding):
    """(b) per switch one native grouped convolution (switches of equal widths only)."""
    batch = x.shape[0] // len(blocks)
    outputs = []
    for s, switch_blocks in enumerate(blocks):
        w = torch.cat([weight[o0:o1, i0:i1] for i0, i1, o0, o1 in switch_blocks])
        xs = _rows(x, s, batch)[:, : switch_blocks[-1][1]]
        y = F.conv2d(xs, w, None, stride, padding, groups=len(switch_blocks))
        outputs.append(_pad_channels(y, weight.shape[0]))
    return torch.cat(outputs)


def block_masks(weight: torch.Tensor, blocks: Sequence[Sequence[Block]]) -> List[torch.Tensor]:
    masks = []
    for switch_blocks in blocks:
        mask = torch.zeros(weight.shape[:2], device=weight.device, dtype=weight.dtype)
        for i0, i1, o0, o1 in switch_blocks:
            mask[o0:o1, i0:i1] = 1
        masks.append(mask[:, :, None, None])
    return masks


def masked_conv(x, weight, masks: Sequence[torch.Tensor], stride, padding):
    """(b) per switch one dense convolution with the weight masked to the switch's blocks."""
    batch = x.shape[0] // len(masks)
    return torch.cat(
        [F.conv2d(_rows(x, s, batch), weight * mask, None, stride, padding) for s, mask in enumerate(masks)]
    )


def grouped_mm_conv1x1(x, weight, blocks: Sequence[Sequence[Block]]):
    """1x1 convolution of equal-width switches by torch._grouped_mm over channels-last rows."""
    batch = x.shape[0] // len(blocks)
    outputs = []
    for s, switch_blocks in enumerate(blocks):
        k, covered = len(switch_blocks), switch_blocks[-1][1]
        xs = _rows(x, s, batch)[:, :covered]
        b, c, h, w = xs.shape
        rows = xs.permute(0, 2, 3, 1).reshape(b * h * w, k, c // k).transpose(0, 1).contiguous()
        # [k, c_in / k, c_out / k], column-major per group as cuBLAS-backed grouped GEMMs prefer
        mats = torch.stack([weight[o0:o1, i0:i1, 0, 0] for i0, i1, o0, o1 in switch_blocks]).transpose(1, 2)
        y = torch._grouped_mm(rows, mats)  # [k, B*H*W, c_out / k]
        y = y.transpose(0, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        outputs.append(_pad_channels(y, weight.shape[0]))
    return torch.cat(outputs)


def loop_bn_relu(x, weight, bias, running_mean, running_var, covered: Sequence[int]):
    """(a) per switch F.batch_norm (training) + ReLU on its covered channels, torch.cat."""
    batch = x.shape[0] // len(covered)
    outputs = []
    for s, c in enumerate(covered):
        y = F.batch_norm(
            _rows(x, s, batch)[:, :c],
            running_mean[s, :c],
            running_var[s, :c],
            weight[s, :c],
            bias[s, :c],
            training=True,
        )
        outputs.append(_pad_channels(F.relu(y), x.shape[1]))
    return torch.cat(outputs)


def stacked_bn_relu(x, weight, bias, running_mean, running_var):
    """(b) one F.batch_norm over [B, S*C, HW]: the switches become channels (all switches covering
    every channel, as in the benchmark suite)."""
    num_switches, channels = weight.shape
    batch = x.shape[0] // num_switches
    stacked = x.reshape(num_switches, batch, channels, -1).transpose(0, 1).reshape(batch, num_switches * channels, -1)
    y = F.relu(
        F.batch_norm(
            stacked, running_mean.view(-1), running_var.view(-1), weight.view(-1), bias.view(-1), training=True
        )
    )
    return y.reshape(batch, num_switches, channels, -1).transpose(0, 1).reshape(x.shape)


class SlimmableLoop:
    """The per-switch loops as a paradis Python backend (bench/run.py registers it as
    SLIMMABLE_LOOP): sliced_conv2d by the reference's per-block F.conv2d, switch_batch_norm by
    ATen's own batch_norm per switch; autograd differentiates both."""

    sliced_conv2d = staticmethod(reference.sliced_conv2d)
    depthwise_conv2d = staticmethod(reference.depthwise_conv2d)

    @staticmethod
    def switch_batch_norm(
        x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual=None
    ):
        if not training:
            return reference.switch_batch_norm(
                x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual
            )
        batch = x.shape[0] // len(covered)
        y = torch.zeros_like(x) if residual is None else reference.activate(residual, activation).clone()
        mean = x.new_zeros(len(covered), x.shape[1], dtype=torch.float32)
        var = torch.zeros_like(mean)
        for s, (c, r) in enumerate(zip(covered, rows)):
            block = slice(s * batch, (s + 1) * batch)
            out, m, invstd = torch.native_batch_norm(
                x[block, :c], weight[r, :c], bias[r, :c], None, None, True, 0.0, eps
            )
            if residual is not None:
                out = out + residual[block, :c]
            y[block, :c] = reference.activate(out, activation)
            mean[s, :c], var[s, :c] = m.detach(), invstd.detach().pow(-2) - eps
        return y, mean, var


def bn_covered(switches: SwitchSet, channels: int) -> List[int]:
    return list(covered_channels(switches, channels))
