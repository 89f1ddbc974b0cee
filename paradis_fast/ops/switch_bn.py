"""switch_batch_norm — BatchNorm(+activation) with private statistics per switch (DESIGN §3).

The op itself is functional (it returns the statistics it used); the running-statistics update
is a few in-place tensor ops here, shared by every backend.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import checks, layout, library
from .backends import backend_for
from .plan import cached_outside_tracing, covered_channels
from .reference import accumulation_dtype
from ..switches import SwitchSetLike

OP = "switch_batch_norm"
UPDATE = "update_running_stats_"
ACTIVATIONS = ("none", "relu", "relu6")


@library.register_fake(OP)
def _(x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual=None):
    stats = x.new_empty(len(covered), x.shape[1], dtype=accumulation_dtype(x.dtype))
    return layout.empty(x.shape, x), stats, torch.empty_like(stats)


@library.register_fake(f"{OP}_backward")
def _(grad_y, x, weight, bias, mean, var, covered, rows, training, eps, activation):
    return layout.empty(x.shape, x), torch.empty_like(weight), torch.empty_like(bias)


@cached_outside_tracing(maxsize=1024)
def _coverage(
    covered: tuple[int, ...], channels: int, scale: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """[S, C], ``scale`` where switch s covers channel c, else 0 (shared: never written)."""
    covers = torch.arange(channels, device=device) < torch.tensor(covered, device=device)[:, None]
    return covers.to(dtype) * scale


@library.register_fake(UPDATE)
def _(running_mean, running_var, mean, var, covered, rows, count, momentum, momentum_per_switch=None):
    return None


def update_running_stats(running_mean, running_var, mean, var, covered, rows, count, momentum) -> None:
    """running = (1 - momentum) * running + momentum * batch (unbiased variance), covered channels only.

    `momentum` is a float or a per-switch tensor (the cumulative average of momentum=None). One
    pass of C++ (paradis::update_running_stats_) where the library has the device's kernel: from
    Python the update was a few tensor ops and as long as a small layer's kernel. Tensor ops
    elsewhere, and while torch.compile traces (its compiler fuses them)."""
    if not torch.compiler.is_compiling() and library.has_kernel(UPDATE, running_mean.device.type):
        momentum, per_switch = (0.0, momentum) if isinstance(momentum, Tensor) else (momentum, None)
        library.op(UPDATE)(running_mean, running_var, mean, var, covered, rows, count, momentum, per_switch)
    else:
        update_running_stats_with_tensor_ops(running_mean, running_var, mean, var, covered, rows, count, momentum)


@torch.no_grad()
def update_running_stats_with_tensor_ops(running_mean, running_var, mean, var, covered, rows, count, momentum) -> None:
    """update_running_stats in ATen tensor ops, for every device. The kernels return zero
    statistics for the channels a switch does not cover (every backend does). Few tensor ops,
    none with a Python number as a tensor operand (each costs a scalar tensor's conversion)."""
    num_rows, channels = running_mean.shape
    dtype, device = running_mean.dtype, running_mean.device
    if isinstance(momentum, Tensor):
        momentum = momentum.to(device=device, dtype=dtype)
    mean, var = (t if t.dtype == dtype else t.to(dtype) for t in (mean, var))
    bessel = count / max(count - 1, 1)  # the unbiased variance is var * bessel
    num_switches = len(rows)
    if list(rows) == list(range(num_switches)):
        # switch s updates row s (a model training all its switches, or its first ones): the
        # tables' leading rows update whole, in place, uncovered channels with weight 0 (running +
        # 0 * (0 - running) is running); the variance as lerp(var) + weight * (bessel - 1) * var
        partly = any(c != channels for c in covered)
        if isinstance(momentum, Tensor):
            weight = momentum[:, None]
            if partly:
                weight = _coverage(tuple(covered), channels, 1.0, dtype, device) * weight
        else:
            weight = _coverage(tuple(covered), channels, momentum, dtype, device) if partly else momentum
        rm, rv = (
            (running_mean, running_var)
            if num_switches == num_rows
            else (t[:num_switches] for t in (running_mean, running_var))
        )
        rm.lerp_(mean, weight)
        rv.lerp_(var, weight)
        if isinstance(weight, Tensor):
            rv.addcmul_(weight, var, value=bessel - 1)
        else:
            rv.add_(var, alpha=weight * (bessel - 1))
        return
    # otherwise each switch's row over its covered channels: one fused update of those slices
    unbiased = var * bessel
    tables = ((running_mean, mean), (running_var, unbiased))
    active = list(enumerate(zip(rows, covered)))
    targets = [running[row, :c] for running, _ in tables for _, (row, c) in active]
    sources = [batch[s, :c] for _, batch in tables for s, (_, c) in active]
    if isinstance(momentum, Tensor):
        torch._foreach_lerp_(targets, sources, [momentum[s] for _ in tables for s, _ in active])
    else:
        torch._foreach_lerp_(targets, sources, momentum)


_CHECKED = checks.CheckedCalls()


def _signature(x, weight, bias, running_mean, running_var, switches, training, activation, rows, residual):
    """Everything `_check` reads; None where the checks must run (a traced call, arguments not
    tensors)."""
    if torch.compiler.is_compiling():
        return None
    try:
        # whether a residual of another dtype is fine
        autocast = residual is not None and residual.dtype != x.dtype and checks.autocast_unifies(x, residual)
        tensors = checks.tensor_signature(x, weight, bias, running_mean, running_var, residual)
        return switches, training, activation, None if rows is None else tuple(rows), autocast, tensors
    except (AttributeError, TypeError):
        return None


def _check(x, weight, bias, running_mean, running_var, switches, training, activation, rows, residual):
    """Validates a call; returns what the op takes from it: (covered, rows, count, activation)."""
    checks.tensors(
        OP, x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var, residual=residual
    )
    if residual is not None and (
        residual.shape != x.shape or (residual.dtype != x.dtype and not checks.autocast_unifies(x, residual))
    ):
        raise ValueError(
            f"{OP}: residual must have x's shape and dtype {tuple(x.shape)} {x.dtype}, "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    checks.rank(OP, "x", x, range(2, 9), "[S*B, C, ...] (at least 2-D)")
    activation = "none" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: unknown activation {activation!r}; choose None, 'relu' or 'relu6'")
    params = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    checks.same_dtype(OP, **params)
    if weight.dtype != x.dtype and weight.dtype != torch.float32:
        raise TypeError(
            f"{OP}: mixed dtypes (x {x.dtype}, parameters {weight.dtype}); parameters must be float32 or x's dtype"
        )
    rows = tuple(range(len(switches))) if rows is None else tuple(int(r) for r in rows)
    channels = x.shape[1]
    for name, value in params.items():
        checks.rank(OP, name, value, 2, "[S, C]")
        if value.shape[1] != channels:
            raise ValueError(f"{OP}: {name} has {value.shape[1]} channels, x has {channels} (channel mismatch)")
        if value.shape[0] != weight.shape[0]:
            raise ValueError(f"{OP}: {name} has {value.shape[0]} switch rows, weight has {weight.shape[0]}")
    if len(rows) != len(switches) or len(set(rows)) != len(rows) or not all(0 <= r < weight.shape[0] for r in rows):
        raise ValueError(
            f"{OP}: parameters have {weight.shape[0]} switch rows, which does not fit "
            f"the {len(switches)} switches {switches} (rows {list(rows)})"
        )
    batch = checks.batch_divisible(OP, x.shape[0], len(switches))
    count = batch * math.prod(x.shape[2:])
    if training and count < 2:
        raise ValueError(f"{OP}: training needs more than 1 value per channel and switch, got {count}")
    covered = covered_channels(switches, channels)
    return covered, rows, count, activation


def switch_batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    switches: SwitchSetLike,
    training: bool,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    rows: Optional[Sequence[int]] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """BatchNorm with private ``[S, C]`` affine parameters and statistics per switch, the
    activation (None, "relu", "relu6") fused. x is ``[S*B, C, ...]`` stacked switch-major.

    Channels a switch does not cover stay zero and their running statistics untouched.
    ``rows`` maps each switch to its parameter row (default: switch s uses row s), so a model
    can run a subset of its switches while the parameters of the others stay untouched.
    ``residual`` (x's shape and dtype): y = activation(BatchNorm(x) + residual), a residual
    block's tail, added in the kernel's own pass where the backend fuses it (``cpu``).

    Under torch.autocast x comes in the autocast dtype and the parameters and statistics stay
    float32 (computed in float32, y in x's dtype), as with F.batch_norm; a residual of another
    dtype is promoted with x to the wider one.
    """
    switches = checks.switch_set(switches)
    signature = _signature(x, weight, bias, running_mean, running_var, switches, training, activation, rows, residual)
    checked = _CHECKED.get(signature)
    if checked is None:
        checked = _check(x, weight, bias, running_mean, running_var, switches, training, activation, rows, residual)
        _CHECKED.put(signature, checked)
    covered, rows, count, activation = checked
    backend = backend_for(OP, x.device)
    y, mean, var = backend.function(OP)(
        x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual
    )
    if training:
        # a Python backend runs no kernel of the library (the reference is plain PyTorch throughout)
        update = update_running_stats if backend.implementation is None else update_running_stats_with_tensor_ops
        update(running_mean, running_var, mean, var, covered, rows, count, momentum)
    return y
