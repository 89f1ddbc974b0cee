"""Triton kernels of paradis_fast (installed as paradis_fast.kernels), one module per op.

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before this package is imported), which is how CI tests them. This module holds the few host
helpers both ops share.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

_ACCUMULATION = {torch.float64: tl.float64}


def accumulation_type(dtype: torch.dtype):
    """fp32 accumulation for fp32/fp16/bf16 inputs, fp64 for fp64 (as the reference backend)."""
    return _ACCUMULATION.get(dtype, tl.float32)


@functools.lru_cache(maxsize=1024)
def device_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 table on `device`, copied there once per distinct content (not once per call)."""
    return torch.tensor(values, dtype=torch.int64, device=device)


def on_device(tensor: torch.Tensor):
    """Launches go to the tensor's GPU (Triton launches on the current device and stream)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_int32_span(op: str, what: str, size: int) -> None:
    """Offsets inside one sample or one (switch, channel) run stay int32; row offsets are int64."""
    if size >= 2**31:
        raise ValueError(f"{op}: {what} spans {size} elements; the triton kernels need it below 2**31")


def split_evenly(total: int, parts: int, block: int) -> tuple[int, int]:
    """(length, count) of about `parts` runs covering `total` values; runs longer than `block` are
    a multiple of it, so the programs sharing a reduction start on aligned tiles."""
    length = triton.cdiv(total, max(1, parts))
    if length > block:
        length = triton.cdiv(length, block) * block
    return length, triton.cdiv(total, length)
