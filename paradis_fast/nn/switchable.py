"""Switchable: a module built for a switch set that runs a chosen subset of it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.layout import memory_format
from ..switches import SwitchSet, SwitchSetLike


class Switchable(nn.Module):
    """Owns a switch set; `set_active` picks the switches a forward runs, for the whole subtree."""

    def __init__(self, switches: SwitchSetLike):
        super().__init__()
        self.channels_last: bool | None = None  # None: on CPU (see input_layout)
        self.switches = SwitchSet.of(switches)
        self.active = self.switches
        self.active_rows = tuple(range(len(self.switches)))

    def input_layout(self, x: Tensor) -> Tensor:
        """Images in the layout the model runs in: channels_last on CPU unless ``channels_last`` says
        otherwise, because the C++ kernels' NHWC paths and oneDNN's depthwise convolution are faster
        that way (bench/README.md); elsewhere the caller's layout."""
        use = x.device.type == "cpu" if self.channels_last is None else self.channels_last
        if not use or x.dim() != 4 or memory_format(x) == torch.channels_last:
            return x
        # empty_like gives a one-channel image channels_last's own strides (contiguous() would keep
        # NCHW's, the same memory): the ops read the layout from the strides and pass it on.
        return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)

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
                    raise ValueError(
                        f"{type(module).__name__} has switches {module.switches}, its parent {self.switches}"
                    )
                module.active, module.active_rows = active, rows
        return self
