"""The baselines ParaDiS is compared with, trained by the same trainer.

- individual: each switch's distributed structure trained alone, as a model whose switch set is
  just that switch (plain cross-entropy: nothing to distil from);
- slimmable: a universally slimmable network, i.e. prefix channel slices ``1xW`` of one network on
  one device, trained with the sandwich rule (the widest, the narrowest and a few random widths each
  step) and in-place distillation from the widest.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..switches import Switch, SwitchSet, SwitchSetLike

BASELINES = ("individual", "slimmable")
WIDTH_GRID = 32  # equal-cost slimmable widths are rounded to multiples of 1/32


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
    return SwitchSet([Switch([w]) for w in sorted(widths, reverse=True)])


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
