"""The backend contract (DESIGN §4): what each backend offers, the one list they are registered
in, and the choice of one per op call: the first automatic backend that serves the op on the
tensor's device, unless one is forced with `use_backend(name)` or the PARADIS_BACKEND variable.

Two kinds of backend implement the ops. A *dispatcher* backend is the paradis op itself
(`torch.ops.paradis.<op>`, csrc/paradis.cpp), whose kernels are registered for its devices'
dispatch keys: the choice is made once per forward call, and the backward runs the same device's
backward kernel through the op's autograd. A *Python* backend is an object whose attribute
``<op>`` computes the op in plain differentiable PyTorch, with the op's arguments: autograd
differentiates it (the `reference` oracle; the benchmark's per-switch loop).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Any, Callable

import torch

from . import layout, library, reference

OPS = ("sliced_conv2d", "switch_batch_norm", "depthwise_conv2d")


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one backend offers.

    ``implementation`` None means the paradis ops' own kernels for ``devices`` (a dispatcher
    backend: it serves every op with a kernel for its devices, ``ops`` None); otherwise an object
    whose attribute ``<op>`` implements each op of ``ops``.
    ``channels_last`` lists the ops whose kernels run channels_last tensors without a copy,
    ``fusions`` what the kernels do within their own pass; both describe, neither routes.
    ``automatic`` backends may be chosen without being forced."""

    name: str
    devices: tuple[str, ...]
    ops: tuple[str, ...] | None = None
    implementation: Any = None
    channels_last: tuple[str, ...] = ()
    fusions: tuple[str, ...] = ()
    automatic: bool = True

    def unavailable_reason(self, op: str, device: torch.device) -> str | None:
        """None when this backend can run ``op`` on tensors of ``device``, else why not."""
        if self.ops is not None and op not in self.ops:
            return f"it does not implement {op}"
        if device.type not in self.devices:
            return f"it runs on {' or '.join(self.devices)} tensors, not {device.type}"
        return None if self.implementation is not None else library.missing_kernel(op, device.type)

    def function(self, op: str) -> Callable:
        """The differentiable function computing ``op``, with the paradis op's arguments; its
        first output (y) comes back in x's layout."""
        if self.implementation is None:
            return library.op(op)
        return _in_layout_of_x(getattr(self.implementation, op))


class _GradInLayout(torch.autograd.Function):
    """The identity, its gradient in the layout of its input: grad_x keeps the ops' layout contract
    whatever autograd computes it through."""

    @staticmethod
    def forward(ctx, x):
        ctx.fmt = layout.memory_format(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.fmt)


def _in_layout_of_x(fn: Callable) -> Callable:
    """fn with its first output and x's gradient in the layout of its first argument (x), as the
    kernels return them."""

    @functools.wraps(fn)
    def wrapped(x, *args):
        fmt = layout.memory_format(x)
        result = fn(_GradInLayout.apply(x) if x.requires_grad else x, *args)
        if isinstance(result, torch.Tensor):
            return result.contiguous(memory_format=fmt)
        return (result[0].contiguous(memory_format=fmt), *result[1:])

    return wrapped


CPU = Backend("cpu", ("cpu",), channels_last=OPS, fusions=("switch_batch_norm+residual",))
CUDA = Backend("cuda", ("cuda",))
REFERENCE = Backend("reference", ("cpu", "cuda"), OPS, implementation=reference, channels_last=OPS)
BACKENDS: list[Backend] = [CPU, CUDA, REFERENCE]
_TRACED = {"cpu": CPU, "cuda": CUDA}  # what a traced call records: the device's paradis op


def register_backend(backend: Backend) -> None:
    """Adds a backend to the list (after the others: automatic choice prefers the earlier ones)."""
    if any(b.name == backend.name for b in BACKENDS):
        raise ValueError(f"a paradis backend named {backend.name!r} is already registered")
    BACKENDS.append(backend)


def backend(name: str) -> Backend:
    for candidate in BACKENDS:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown paradis backend {name!r}; choose from {sorted(b.name for b in BACKENDS)}")


_AUTOMATIC = "automatic"  # use_backend(None): automatic choice, even over PARADIS_BACKEND
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("paradis_backend", default=None)


def forced_backend() -> str | None:
    """The backend forced by use_backend() or PARADIS_BACKEND, if any."""
    forced = _forced.get()
    if forced is None:
        return os.environ.get("PARADIS_BACKEND") or None
    return None if forced == _AUTOMATIC else forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend (or automatic choice with None) for the ops called inside the block; what
    a call chose holds for its backward, wherever that runs."""
    if name is not None:
        backend(name)
    token = _forced.set(_AUTOMATIC if name is None else name)
    try:
        yield
    finally:
        _forced.reset(token)


def backend_for(op: str, device: torch.device) -> Backend:
    """The backend that runs ``op`` on ``device``; a forced backend that cannot says why.
    torch.compile and torch.export trace the paradis ops themselves (forced backends are eager)."""
    if torch.compiler.is_compiling():
        return _TRACED.get(device.type, REFERENCE) if library.LOADED else REFERENCE
    name = forced_backend()
    if name is not None:
        chosen = backend(name)
        reason = chosen.unavailable_reason(op, device)
        if reason is not None:
            raise RuntimeError(f"paradis backend {name!r} cannot run {op} on {device.type}: {reason}")
        return chosen
    for candidate in BACKENDS:
        if candidate.automatic and candidate.unavailable_reason(op, device) is None:
            return candidate
    return REFERENCE


def available_backends(op: str | None = None, device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run ``op`` (or any op when None) on tensors of ``device``."""
    device = torch.device(device)
    ops = [op] if op else OPS
    return [b.name for b in BACKENDS if any(b.unavailable_reason(o, device) is None for o in ops)]
