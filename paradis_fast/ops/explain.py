"""explain — which path sliced_conv2d runs for a layer, and why (issue 19: the choice is visible).

The CPU kernel measures its candidate paths on a layer shape's first forward and first backward
call and keeps the faster (csrc/cpu/measured_choice.h); other backends have one path per op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import backend_for
from .sliced_conv import OP, sliced_conv2d
from ..switches import SwitchSetLike


def explain(
    x: Tensor,
    weight: Tensor,
    switches: SwitchSetLike,
    stride=1,
    padding=0,
    dilation=1,
    bias: Tensor | None = None,
    input_shared: bool = False,
) -> str:
    """The backend that serves ``sliced_conv2d(x, weight, bias, switches, ...)`` and, on the CPU
    kernel, the path its forward and its backward run, with the times that chose them.

    Runs one forward and backward on detached copies of the tensors (so a shape's measuring first
    call happens here, not in the caller's first step)."""
    backend = backend_for(OP, x.device)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = sliced_conv2d(leaves[0], leaves[1], leaves[2], switches, stride, padding, dilation, input_shared)
    y.backward(torch.ones_like(y))
    if backend.name != "cpu":
        return f"{OP}: {backend.name} backend (one path per op, nothing measured)"
    from paradis_fast import _C

    backward, forward = _C.sliced_conv2d_decisions()[:2]
    return f"{OP}: cpu backend\n  {forward}\n  {backward}"
