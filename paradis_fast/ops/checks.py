"""Input validation shared by the ops: clear errors instead of crashes or silent wrong answers."""

from __future__ import annotations

from typing import Sequence

import torch

from ..switches import SwitchSet, SwitchSetLike


def switch_set(switches: SwitchSetLike) -> SwitchSet:
    if switches is None:
        raise ValueError("empty switch set: give at least one switch such as '1x1.0'")
    return SwitchSet.of(switches)


def tensors(op: str, **named: torch.Tensor | None) -> list[torch.Tensor]:
    """Every named argument is a floating tensor (or None), all on one device."""
    present = []
    for name, value in named.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        present.append((name, value))
    devices = {value.device for _, value in present}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {value.device}" for name, value in present)
        raise ValueError(f"{op}: tensors are on mixed devices ({where})")
    return [value for _, value in present]


def same_dtype(op: str, **named: torch.Tensor | None) -> None:
    dtypes = {name: value.dtype for name, value in named.items() if value is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"{op}: mixed dtypes ({listing}); convert them to one dtype")


def autocast_unifies(*values: torch.Tensor | None) -> bool:
    """Whether the torch.autocast active on the tensors' device brings them to one dtype, as it does
    for F.conv2d's arguments (it never casts float64)."""
    present = [value for value in values if value is not None]
    device_type = present[0].device.type
    return (
        torch.amp.is_autocast_available(device_type)
        and torch.is_autocast_enabled(device_type)
        and all(value.dtype != torch.float64 for value in present)
    )


def rank(op: str, name: str, value: torch.Tensor, expected: int | Sequence[int], layout: str) -> None:
    allowed = (expected,) if isinstance(expected, int) else tuple(expected)
    if value.dim() not in allowed:
        raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(value.shape)}")


def pair(op: str, name: str, value, minimum: int) -> list[int]:
    values = [value, value] if isinstance(value, int) else list(value)
    if len(values) != 2 or not all(isinstance(v, int) and v >= minimum for v in values):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return values


def batch_divisible(op: str, rows: int, num_switches: int) -> int:
    if rows % num_switches:
        raise ValueError(
            f"{op}: input has {rows} rows, not a multiple of the {num_switches} switches "
            "(activations are stacked switch-major: [S*B, C, ...])"
        )
    return rows // num_switches


class CheckedCalls:
    """What an op's argument checks derived, per call signature (everything the checks read:
    shapes, dtypes, devices, switches, options). A layer calls its op with one signature step
    after step, and the checks -- tens of attribute reads and comparisons in Python -- took as
    long as a small layer's kernel. A signature of None (a traced call) or one not hashable is
    never stored. Bounded: the oldest signature leaves first."""

    def __init__(self, maxsize: int = 1024):
        self._calls: dict = {}
        self._maxsize = maxsize

    def get(self, signature):
        try:
            return None if signature is None else self._calls.get(signature)
        except TypeError:  # an argument not hashable (a list of strides): checked at every call
            return None

    def put(self, signature, checked) -> None:
        if signature is None:
            return
        try:
            hash(signature)
        except TypeError:
            return
        if len(self._calls) >= self._maxsize:
            del self._calls[next(iter(self._calls))]
        self._calls[signature] = checked


def tensor_signature(*values: torch.Tensor | None) -> tuple:
    """(shape, dtype, device) of each tensor, None for None; the part of a call signature the
    tensor checks read. Raises AttributeError for a value that is not a tensor."""
    return tuple(None if v is None else (v.shape, v.dtype, v.device) for v in values)
