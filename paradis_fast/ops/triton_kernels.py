"""The Triton kernels of paradis_fast.kernels as kernels of the paradis ops, with the ops' contract
around them: y and grad_x in x's layout (the kernels compute NCHW), a residual added after the
normalisation in a pass of its own.

paradis_fast/ops/library.py registers them for CUDA tensors. Under Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are imported) they also run on CPU tensors: tests
register them for "cpu" in a scoped library (tests/triton_interpreter_cases.py). The kernels are
imported at the first call, so importing paradis_fast neither needs triton nor fixes the
interpreter mode too early.
"""

from __future__ import annotations

import importlib

import torch

from . import layout
from .reference import activate

OPS = ("sliced_conv2d", "switch_batch_norm")


def _kernels(op: str):
    return importlib.import_module(f"paradis_fast.kernels.{op}")


def _in_layout_of(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous(memory_format=layout.memory_format(x))


def sliced_conv2d(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared):
    y = _kernels("sliced_conv2d").sliced_conv2d_forward(
        x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared
    )
    return _in_layout_of(x, y)


def sliced_conv2d_backward(
    grad_y, x, weight, blocks, num_switches, stride, padding, dilation, input_shared, output_mask
):
    grad_x, grad_w, grad_b = _kernels("sliced_conv2d").sliced_conv2d_backward(
        grad_y, x, weight, blocks, num_switches, stride, padding, dilation, input_shared, output_mask
    )
    return _in_layout_of(x, grad_x), grad_w, grad_b


def switch_batch_norm(
    x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual=None
):
    forward = _kernels("switch_batch_norm").switch_batch_norm_forward
    args = (x, weight, bias, running_mean, running_var, covered, rows, training, eps)
    if residual is None:
        y, mean, var = forward(*args, activation)
    else:
        y, mean, var = forward(*args, "none")
        y = activate(y.add_(residual), activation)
    return _in_layout_of(x, y), mean, var


def switch_batch_norm_backward(grad_y, x, weight, bias, mean, var, covered, rows, training, eps, activation):
    grad_x, grad_w, grad_b = _kernels("switch_batch_norm").switch_batch_norm_backward(
        grad_y, x, weight, bias, mean, var, covered, rows, training, eps, activation
    )
    return _in_layout_of(x, grad_x), grad_w, grad_b


def register(lib: torch.library.Library, device_type: str, ops=OPS) -> None:
    """Registers the kernels of ``ops`` (and their backward ops) in ``lib`` for ``device_type``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    for name in ops:
        for kernel in (name, f"{name}_backward"):
            lib.impl(kernel, globals()[kernel], key)
