"""Switchable: a module built for a switch set that runs a chosen subset of it."""
from __future__ import annotations

from torch import nn

from ..switches import SwitchSet, SwitchSetLike


class Switchable(nn.Module):
    """Owns a switch set; `set_active` picks the switches a forward runs, for the whole subtree."""

    def __init__(self, switches: SwitchSetLike):
        super().__init__()
        self.switches = SwitchSet.of(switches)
        self.active = self.switches
        self.active_rows = tuple(range(len(self.switches)))

    def check_slices(self, channels: int, layer: str) -> None:
        """Reject at construction a channel count that leaves some sub-network an empty slice."""
        for switch in self.switches:
            switch.slices(channels, layer=layer)

    def set_active(self, switches: SwitchSetLike | None = None) -> "Switchable":
        """Run only `switches` (in that order; all when None). Parameters of the others stay untouched."""
        active = self.switches if switches is None else SwitchSet.of(switches)
        rows = tuple(self.switches.index(s) for s in active)
        for module in self.modules():
            if isinstance(module, Switchable):
                if module.switches != self.switches:
                    raise ValueError(f"{type(module).__name__} has switches {module.switches}, its parent {self.switches}")
                module.active, module.active_rows = active, rows
        return self
