"""explain — which path sliced_conv2d runs for a layer, and why (issue 19: the choice is visible).

The CPU kernel measures its candidate paths on a layer shape's first forward and first backward
call and keeps the fastest (csrc/cpu/measured_choice.h); other backends have one path per op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, layout
from .backends import backend_for
from .plan import conv_blocks, one_tap_dilation
from .sliced_conv import OP, cut_kernel, sliced_conv2d
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
    kernel, the path its forward and its backward run, with the times that chose them (a layer
    that runs on copies in the other layout also shows the choice made for the copies).

    Runs one forward and backward on detached copies of the tensors (so a shape's measuring first
    call happens here, not in the caller's first step)."""
    backend = backend_for(OP, x.device)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = sliced_conv2d(leaves[0], leaves[1], leaves[2], switches, stride, padding, dilation, input_shared)
    y.backward(torch.ones_like(y))
    if backend.name != "cpu":
        return f"{OP}: {backend.name} backend (one path per op, nothing measured)"
    from paradis_fast import _C

    switch_set = checks.switch_set(switches)
    table = conv_blocks(switch_set, weight.shape[1], weight.shape[0], bool(input_shared))
    blocks = " ".join(f"{s}:{i0}-{i1}>{o0}-{o1}" for s, i0, i1, o0, o1 in zip(*[iter(table)] * 5))
    (sh, sw), (ph, pw), (dh, dw) = (
        checks.pair(OP, name, v, minimum)
        for name, v, minimum in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1))
    )
    weight, (ph, pw) = cut_kernel(x, weight, [sh, sw], [ph, pw], [dh, dw])  # as the op runs the layer
    dh, dw = one_tap_dilation(weight.shape[2:], [dh, dw])
    window = f"{weight.shape[2]}x{weight.shape[3]} stride {sh}x{sw} padding {ph}x{pw} dilation {dh}x{dw}, "
    shape = window + f"x [{x.shape[0]}, {x.shape[1]}, {x.shape[2]}, {x.shape[3]}]"
    layer = f"-> {weight.shape[0]} channels, {len(switch_set)} switches, blocks {blocks},"
    lines = [line for line in _C.sliced_conv2d_decisions() if shape in line and layer in line]
    given, other = (
        ("channels_last", "NCHW") if layout.memory_format(x) == torch.channels_last else ("NCHW", "channels_last")
    )
    shown = []
    for phase in (" for forward", " for backward"):
        here = [line for line in lines if phase in line]
        first = [line for line in here if f" {given} ->" in line]
        # the copies' own choice, where the layer runs on copies in the other layout
        copies = [line for line in here if f" {other} (relayout's copies) ->" in line]
        shown += first + (copies if first[0].startswith("relayout") else [])
    return "\n".join([f"{OP}: cpu backend", *(f"  {line}" for line in shown)])
