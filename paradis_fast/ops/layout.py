"""The memory format contract of the ops: outputs and input gradients come back in the layout of
``x`` (channels_last in, channels_last out), whichever backend ran; other layouts are made NCHW."""
from __future__ import annotations

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a dense NHWC ``x`` (and not also NCHW-contiguous), else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in the memory format of ``x`` (no copy when it already is)."""
    return t.contiguous(memory_format=memory_format(x))


def empty(shape, x: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape``, x's dtype and device, in x's memory format (for fakes)."""
    fmt = memory_format(x) if len(shape) == 4 else torch.contiguous_format
    return x.new_empty(shape).contiguous(memory_format=fmt)
