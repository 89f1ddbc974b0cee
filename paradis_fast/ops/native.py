"""The `cpu` and `cuda` backends: C++/CUDA kernels of paradis_fast._C (the paradis_C op library)."""
from __future__ import annotations

import functools

import torch

from .._extension import load_error


class NativeBackend:
    """Kernels registered in C++ under one dispatch key; an op is served once its kernel exists."""

    def __init__(self, device_type: str, dispatch_key: str, channels_last_ops: tuple[str, ...] = (),
                 residual_ops: tuple[str, ...] = ()):
        self.device_type, self.dispatch_key = device_type, dispatch_key
        # ops whose kernels take channels_last x natively (and return it so); others get NCHW
        self.channels_last_ops = frozenset(channels_last_ops)
        # ops whose kernels add a residual themselves (switch_batch_norm); for others the op adds it
        self.residual_ops = frozenset(residual_ops)

    def unavailable_reason(self, op: str, device: torch.device) -> str | None:
        if device.type != self.device_type:
            return f"it runs on {self.device_type} tensors, not {device.type}"
        return self._missing_kernel(op)

    @functools.lru_cache(maxsize=None)  # asked at every op call; the answer is fixed once _C loads
    def _missing_kernel(self, op: str) -> str | None:
        error = load_error()
        if error is not None:
            return error
        name = f"paradis_C::{op}_backward"  # every op has one (depthwise_conv2d's forward is ATen's)
        try:
            has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(name, self.dispatch_key)
        except RuntimeError:  # the schema itself is not defined: this build of _C lacks the op
            has_kernel = False
        if not has_kernel:
            return f"paradis_fast._C has no {self.dispatch_key} kernel for {op}"
        return None

    @functools.lru_cache(maxsize=None)
    def autograd_op(self, op: str):
        """paradis_C::<op>, the op with its autograd in C++, where this build has it; else None."""
        try:
            has_autograd = torch._C._dispatch_has_kernel_for_dispatch_key(f"paradis_C::{op}", "Autograd")
        except RuntimeError:  # no such schema
            return None
        return getattr(torch.ops.paradis_C, op) if has_autograd and self._missing_kernel(op) is None else None

    def __getattr__(self, name: str):
        if name.endswith("_forward") or name.endswith("_backward"):
            return getattr(torch.ops.paradis_C, name)
        raise AttributeError(name)


cpu = NativeBackend("cpu", "CPU", channels_last_ops=("switch_batch_norm", "sliced_conv2d", "depthwise_conv2d"),
                    residual_ops=("switch_batch_norm",))
cuda = NativeBackend("cuda", "CUDA")
