"""The `triton` backend: the Triton kernels of paradis_fast.kernels.

It serves CUDA tensors. On CPU tensors it runs only when forced and under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are imported): that is how CI tests the kernels, far
too slow to be chosen automatically. The kernels are imported on first use, so importing
paradis_fast neither needs triton nor fixes the interpreter mode too early.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch


def unavailable_reason(op: str, device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"it runs on cuda tensors, not {device.type}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors it needs Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    from .backends import forced_backend  # here: backends imports this module

    if forced_backend() != "triton":
        return "the interpreter is for tests; force it with use_backend('triton')"
    return None


def _kernels(op: str):
    return importlib.import_module(f"paradis_fast.kernels.{op}")


def sliced_conv2d_forward(*args):
    return _kernels("sliced_conv2d").sliced_conv2d_forward(*args)


def sliced_conv2d_backward(*args):
    return _kernels("sliced_conv2d").sliced_conv2d_backward(*args)


def switch_batch_norm_forward(*args):
    return _kernels("switch_batch_norm").switch_batch_norm_forward(*args)


def switch_batch_norm_backward(*args):
    return _kernels("switch_batch_norm").switch_batch_norm_backward(*args)
