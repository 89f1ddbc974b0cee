"""The memory-format contract of the ops: y and grad_x come back in the layout of ``x``
(channels_last in, channels_last out) whichever kernel ran (csrc/layout.h is its C++ twin)."""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D x laid out so: channels_last-contiguous and either not NCHW-contiguous
    or, where the two coincide (one channel, one pixel), with channels_last's own strides (as
    `Switchable.input_layout` marks a one-channel image); else contiguous (NCHW)."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    if not x.is_contiguous() or (x.stride(1) == 1 and x.stride(3) == x.shape[1]):
        return torch.channels_last
    return torch.contiguous_format


def empty(shape, x: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` like x (dtype, device, memory format): for fake impls."""
    fmt = memory_format(x) if len(shape) == 4 else torch.contiguous_format
    return x.new_empty(shape).contiguous(memory_format=fmt)
