"""The memory-format contract of the ops: y and grad_x come back in the layout of ``x``
(channels_last in, channels_last out) whichever backend ran. A backend that lists an op in its
``channels_last_ops`` runs it on channels_last tensors natively; any other gets NCHW copies, and
its result is converted here, once for every backend."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backends import kernels_for


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


def _runs_natively(backend, op: str, wanted: torch.memory_format) -> bool:
    return wanted == torch.contiguous_format or op in getattr(backend, "channels_last_ops", ())


def run(op: str, kernel: str, activations: Sequence[Tensor], *args):
    """``kernel`` of the backend serving ``op`` on ``activations`` laid out as the last of them (x);
    its output (or the first of its outputs: y or grad_x) comes back in that layout."""
    x = activations[-1]
    backend = kernels_for(op, x.device)
    wanted = memory_format(x)
    layout = wanted if _runs_natively(backend, op, wanted) else torch.contiguous_format
    result = getattr(backend, kernel)(*(t.contiguous(memory_format=layout) for t in activations), *args)
    if isinstance(result, Tensor):
        return result.contiguous(memory_format=wanted)
    first, *rest = result
    return (None if first is None else first.contiguous(memory_format=wanted), *rest)


def eager_autograd_op(op: str, x: Tensor):
    """The C++ op with its autograd in C++ (paradis_C::<op>, csrc/autograd.cpp) of the backend
    serving ``op`` on x, where that backend runs x in x's own layout: an eager call then skips
    torch.library's Python dispatch and autograd glue (~0.2 ms per layer call, bench/README.md).
    None otherwise, and while torch.compile or torch.export trace (fake or functional tensors),
    which record the paradis:: custom op."""
    if type(x) is not Tensor or torch.compiler.is_compiling():
        return None
    backend = kernels_for(op, x.device)
    if not _runs_natively(backend, op, memory_format(x)):
        return None
    return getattr(backend, "autograd_op", lambda _: None)(op)
