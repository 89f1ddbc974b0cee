"""The paradis op library (schemas and C++ kernels: csrc/paradis.cpp, loaded from paradis_fast._C)
and what Python registers on it: the Triton kernels as the CUDA kernels the extension lacks
(paradis_fast/ops/triton_kernels.py), and the helper each op's module registers its fake kernel
(for torch.compile and torch.export) with."""

from __future__ import annotations

import functools
import importlib.util

import torch

from .._extension import load_error
from . import layout, triton_kernels

LOADED = load_error() is None


def op(name: str) -> torch._ops.OpOverload:
    """paradis::<name>."""
    return getattr(torch.ops.paradis, name).default


@functools.lru_cache(maxsize=None)  # asked at every op call; fixed once the kernels are registered
def has_kernel(name: str, device_type: str) -> bool:
    """Whether paradis::<name> has a kernel of its own for tensors of ``device_type``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return LOADED and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"paradis::{name}", key)


@functools.lru_cache(maxsize=None)
def missing_kernel(name: str, device_type: str) -> str | None:
    """None when paradis::<name> has a kernel for tensors of ``device_type``, else why not. The
    backward op tells: depthwise_conv2d's forward is ATen's convolution on every device."""
    if not LOADED:
        return load_error()
    if not has_kernel(f"{name}_backward", device_type):
        return f"paradis_fast has no {device_type} kernel for {name} in this build"
    return None


def register_fake(name: str):
    """Registers the decorated function as paradis::<name>'s fake kernel (where the library is loaded)."""

    def decorate(fn):
        if LOADED:
            torch.library.register_fake(f"paradis::{name}")(fn)
        return fn

    return decorate


def convolution_grads_like(x, weight, output_mask):
    """Fake gradients of x (in x's layout), the weight and the bias (contiguous), None where not asked."""
    shapes = [x.shape, weight.shape, weight.shape[:1]]
    grads = [layout.empty(shapes[0], x)] + [x.new_empty(shape) for shape in shapes[1:]]
    return [grad if needed else None for grad, needed in zip(grads, output_mask)]


def _cuda_kernels_from_triton() -> tuple[str, ...]:
    """The ops whose CUDA kernels are Triton's: those the extension has none for (CUDA C++ builds
    bring switch_batch_norm's), where triton is installed."""
    if not LOADED or importlib.util.find_spec("triton") is None:
        return ()
    return tuple(
        name
        for name in triton_kernels.OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"paradis::{name}", "CUDA")
    )


TRITON_CUDA_OPS = _cuda_kernels_from_triton()
if TRITON_CUDA_OPS:
    _TRITON = torch.library.Library("paradis", "IMPL")
    triton_kernels.register(_TRITON, "cuda", TRITON_CUDA_OPS)  # kernels/ is imported at the first call
