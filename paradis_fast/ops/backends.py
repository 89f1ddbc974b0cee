"""Backend choice (DESIGN §4): the fastest available kernel for the tensor's device, unless one
is forced with `use_backend(name)` or the PARADIS_BACKEND environment variable."""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from . import native, reference, triton_backend

BACKENDS = {"reference": reference, "cpu": native.cpu, "cuda": native.cuda, "triton": triton_backend}
# triton is never chosen for CPU tensors: there it only runs, forced, under the interpreter (tests)
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_AUTOMATIC = "automatic"  # use_backend(None): automatic choice, even over PARADIS_BACKEND
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("paradis_backend", default=None)


def _backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown paradis backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name]


def forced_backend() -> str | None:
    """The backend forced by use_backend() or PARADIS_BACKEND, if any."""
    forced = _forced.get()
    if forced is None:
        return os.environ.get("PARADIS_BACKEND") or None
    return None if forced == _AUTOMATIC else forced


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend (or automatic choice with None) for the ops run inside the block."""
    if name is not None:
        _backend(name)
    token = _forced.set(_AUTOMATIC if name is None else name)
    try:
        yield
    finally:
        _forced.reset(token)


def kernels_for(op: str, device: torch.device):
    """The backend module that runs `op` on `device`; a forced backend that cannot says why."""
    name = forced_backend()
    if name is not None:
        reason = _backend(name).unavailable_reason(op, device)
        if reason is not None:
            raise RuntimeError(f"paradis backend {name!r} cannot run {op} on {device.type}: {reason}")
        return _backend(name)
    for candidate in PREFERENCE.get(device.type, ("reference",)):
        backend = _backend(candidate)
        if backend.unavailable_reason(op, device) is None:
            return backend
    return reference


def available_backends(op: str | None = None, device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run `op` (or any op when None) on tensors of `device`."""
    device = torch.device(device)
    ops = [op] if op else ["sliced_conv2d", "switch_batch_norm"]
    return [
        name
        for name, backend in BACKENDS.items()
        if any(backend.unavailable_reason(o, device) is None for o in ops)
    ]
