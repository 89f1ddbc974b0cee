"""The baselines ParaDiS is compared with, trained by the same trainer.

- individual: each switch's distributed structure trained alone, as a model whose switch set is
  just that switch (plain cross-entropy: nothing to distil from);
- slimmable: a slimmable network, i.e. a finite set of prefix channel slices ``1xW`` of one network
  on one device, each with private BatchNorm, trained with the sandwich rule (the widest, the
  narrowest and a few random widths each step) and in-place distillation from the widest;
- universally-slimmable: a US-Net (Yu & Huang 2019), every width of a range on the 1/32 grid: the
  sandwich rule draws its random widths uniformly from the range, BatchNorm's affine parameters are
  shared by all widths, and each evaluated width's statistics are calibrated on training batches
  before it is evaluated (`UniversalWidths`).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from ..errors import UserError
from ..nn import SwitchBatchNorm2d
from ..switches import Switch, SwitchSet, SwitchSetLike

BASELINES = ("individual", "slimmable", "universally-slimmable")
WIDTH_GRID = 32  # equal-cost slimmable widths are rounded to multiples of 1/32; US-Nets sample them


def relative_cost(switch: Switch) -> Fraction:
    """FLOPs per image relative to ``1x1.0``, counting the sliced convolutions that dominate them:
    sub-network j's block of a C_out x C_in layer costs w_j^2 of the full layer."""
    return sum((w * w for w in switch.widths), Fraction(0))


def equal_cost_width(switch: Switch) -> Fraction:
    """The slimmable width ``W`` whose ``1xW`` costs what ``switch`` costs per image (sqrt of the sum
    of squared widths), on a 1/32 grid."""
    return Fraction(round(math.sqrt(relative_cost(switch)) * WIDTH_GRID), WIDTH_GRID)


def slimmable_switches(switches: SwitchSetLike) -> SwitchSet:
    """Widths a slimmable baseline needs to face every ParaDiS switch: 1.0, each switch's per-device
    width (same cost per device) and its equal-cost width (same FLOPs per image), widest first."""
    widths = {Fraction(1)}
    for switch in SwitchSet.of(switches):
        widths.add(max(switch.widths))
        widths.add(equal_cost_width(switch))
    return _one_device(widths)


def _one_device(widths) -> SwitchSet:
    """``1xW`` for each width, widest first."""
    return SwitchSet([Switch([w]) for w in sorted(set(widths), reverse=True)])


class UniversalWidths:
    """The widths of a universally slimmable network for the ParaDiS ``switches``.

    The range [low, high] is [narrowest `slimmable_switches` width, 1] unless ``bounds`` (two widths)
    says otherwise. ``sampled``: low, high and every multiple of 1/WIDTH_GRID between (what
    `Sandwich` draws from: uniform widths on the grid the channel counts can realise); ``evaluated``:
    low, high and the `slimmable_switches` widths in the range (those the reproduction compares);
    ``switches``: both, the model's switch set.
    """

    def __init__(self, switches: SwitchSetLike, bounds: list | None = None):
        faced = [s.widths[0] for s in slimmable_switches(switches)]
        if bounds is None:
            low, high = min(faced), Fraction(1)
        elif len(bounds) == 2:
            low, high = sorted(Fraction(b) for b in bounds)
        else:
            raise UserError(f"a universally slimmable network takes two widths, min,max; got {len(bounds)}")
        grid = range(math.ceil(low * WIDTH_GRID), math.floor(high * WIDTH_GRID) + 1)
        self.sampled = _one_device({low, high, *(Fraction(k, WIDTH_GRID) for k in grid)})
        self.evaluated = _one_device({low, high, *(w for w in faced if low <= w <= high)})
        self.switches = _one_device(s.widths[0] for s in (*self.sampled, *self.evaluated))


def share_batch_norm_affine(model: nn.Module) -> int:
    """One affine row for all switches in every SwitchBatchNorm2d (see its `share_affine`); returns
    how many layers that is."""
    norms = [m for m in model.modules() if isinstance(m, SwitchBatchNorm2d)]
    for norm in norms:
        norm.share_affine()
    return len(norms)


class Sandwich:
    """Sandwich rule: each step runs the widest and the narrowest switch plus ``random`` others drawn
    without replacement, widest first (the teacher)."""

    def __init__(self, switches: SwitchSetLike, random: int = 2):
        self.switches = SwitchSet.of(switches)
        self.random = random
        order = sorted(range(len(self.switches)), key=lambda i: -self.switches[i].total_width)
        self.widest, self.narrowest, self.middle = order[0], order[-1], order[1:-1]

    def __call__(self, generator: torch.Generator) -> SwitchSet:
        picks = torch.randperm(len(self.middle), generator=generator)[: self.random].tolist()
        chosen = [self.widest] + sorted(self.middle[p] for p in picks)
        if self.narrowest != self.widest:
            chosen.append(self.narrowest)
        return SwitchSet([self.switches[i] for i in chosen])
