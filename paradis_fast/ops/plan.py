"""Slice plans: the (switch, sub-network) block tables the kernels consume, cached per layer shape.

A conv block is five ints (switch, in_start, in_stop, out_start, out_stop); plans travel to the
custom ops as flat int lists so that torch.compile treats them as constants.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, TypeVar

import torch

from ..switches import SwitchSet

BLOCK_FIELDS = 5

F = TypeVar("F", bound=Callable)


def cached_outside_tracing(maxsize: int) -> Callable[[F], F]:
    """functools.lru_cache for eager calls; while torch.compile / torch.export trace, the plain function.

    Dynamo cannot use an lru_cache: it warns at every cached call it traces and runs the wrapped function
    anyway. The wrapped function must be pure (same arguments, same result), so both paths agree; the
    cached one keeps ``cache_info`` and ``cache_clear``."""

    def decorate(function: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return function(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear
        return call

    return decorate


@cached_outside_tracing(maxsize=4096)
def conv_blocks(switches: SwitchSet, in_channels: int, out_channels: int, input_shared: bool) -> tuple[int, ...]:
    """Flat block table of a sliced convolution; the stem (input_shared) reads every input channel."""
    blocks: list[int] = []
    for s, switch in enumerate(switches):
        outs = switch.slices(out_channels)
        ins = [(0, in_channels)] * len(outs) if input_shared else switch.slices(in_channels)
        for (i0, i1), (o0, o1) in zip(ins, outs):
            blocks += [s, i0, i1, o0, o1]
    return tuple(blocks)


def iter_blocks(blocks):
    """Yield (switch, in_start, in_stop, out_start, out_stop) from a flat block table."""
    for k in range(0, len(blocks), BLOCK_FIELDS):
        yield tuple(blocks[k : k + BLOCK_FIELDS])


@cached_outside_tracing(maxsize=4096)
def covered_channels(switches: SwitchSet, channels: int) -> tuple[int, ...]:
    """How many leading channels each switch covers (validating that no slice is empty)."""
    return tuple(switch.slices(channels)[-1][1] for switch in switches)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def one_tap_dilation(kernel: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """dilation, 1 along a dimension of one tap, where it changes nothing (the CPU kernel does the
    same: one choice key per layer, and no dilated one-wide kernel for oneDNN, which crashed on some)."""
    return [1 if k == 1 else d for k, d in zip(kernel, dilation)]


def live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int]:
    """(first, stop, padding): along one dimension, the taps outside ``[first, stop)`` read only
    padding for every output, so they add nothing -- where the kernel overhangs a small image (a
    3x3 kernel on a 1-pixel image reads the image with its centre tap only) -- and the convolution
    with the kernel cut to ``[first, stop)`` and that padding is the same one, when the cut is
    symmetric (a convolution's padding is). Else ``(0, kernel, padding)``."""
    outputs = conv_output_size(size, kernel, stride, padding, dilation)
    live = []
    for i in range(kernel):
        offset = i * dilation - padding  # output o reads o * stride + offset
        first = max(0, -(offset // stride))  # the first output reading at or after the image's start
        if first < outputs and first * stride + offset < size:
            live.append(i)
    if not live or (live[0], live[-1] + 1) == (0, kernel):
        return 0, kernel, padding
    before, after = padding - live[0] * dilation, padding - (kernel - 1 - live[-1]) * dilation
    if before != after or before < 0:
        return 0, kernel, padding
    return live[0], live[-1] + 1, before
