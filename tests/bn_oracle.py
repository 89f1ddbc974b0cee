"""The float64 oracle of switch_batch_norm and its case builders, shared by the op's tests on
every backend (test_switch_batch_norm.py, test_gpu.py, the Triton interpreter cases).

Oracle: per switch s and covered channel c, mean and biased variance over (batch rows of s, H, W)
computed directly, normalised, affine with parameter row rows[s], then the activation; eval mode
uses the running statistics of row rows[s]. Gradients come from autograd.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from paradis_fast import Switch

EPS = 1e-5
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


# ------------------------------------------------------------------------------------- oracle
def covered(switch: str, channels: int) -> int:
    """b_k = floor(C * (w_1 + ... + w_k) + 1/2), with exact fractions."""
    return math.floor(channels * sum(Switch.parse(switch).widths, Fraction(0)) + Fraction(1, 2))


def oracle(x, weight, bias, running_mean, running_var, switches, training, eps, activation, rows, residual=None):
    num_switches = len(switches)
    batch = x.shape[0] // num_switches
    dims = [0, *range(2, x.dim())]
    y = torch.zeros_like(x)
    stats = []
    for s, switch in enumerate(switches):
        c, r = covered(switch, x.shape[1]), rows[s]
        shape = (1, c) + (1,) * (x.dim() - 2)
        xs = x[s * batch : (s + 1) * batch, :c]
        if training:
            count = xs.numel() // c
            mean = xs.sum(dims) / count
            var = ((xs - mean.view(shape)) ** 2).sum(dims) / count
        else:
            mean, var = running_mean[r, :c], running_var[r, :c]
        z = (xs - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight[r, :c].view(shape) + bias[r, :c].view(
            shape
        )
        y[s * batch : (s + 1) * batch, :c] = z
        stats.append((c, r, mean.detach(), var.detach(), xs.numel() // c))
    if residual is not None:  # a residual block's tail: the activation follows the sum
        y = y + residual
    if activation == "relu":
        y = torch.clamp(y, min=0)
    elif activation == "relu6":
        y = torch.clamp(y, min=0, max=6)
    return y, stats


# ------------------------------------------------------------------------------------- helpers
def make_inputs(case, g=None):
    g = g or torch.Generator().manual_seed(case["seed"])
    f64 = torch.float64
    num_switches, channels = len(case["switches"]), case["channels"]
    x = torch.randn(num_switches * case["batch"], channels, *case["spatial"], generator=g, dtype=f64) * 2 + 0.5
    rows_total = case["num_rows"]
    weight = torch.randn(rows_total, channels, generator=g, dtype=f64) * 3
    bias = torch.randn(rows_total, channels, generator=g, dtype=f64) * 2
    running_mean = torch.randn(rows_total, channels, generator=g, dtype=f64)
    running_var = torch.rand(rows_total, channels, generator=g, dtype=f64) + 0.5
    return [t.to(case["dtype"]) for t in (x, weight, bias, running_mean, running_var)], g


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def check_zeros_outside(switches, rows, rows_total, channels, y, grad_x, grad_w, grad_b):
    """y (None: not checked, as with a residual) and the gradients are exactly 0 where no switch reads."""
    batch = grad_x.shape[0] // len(switches)
    used = torch.zeros(rows_total, channels, dtype=torch.bool)
    for s, switch in enumerate(switches):
        c = covered(switch, channels)
        block = slice(s * batch, (s + 1) * batch)
        assert y is None or torch.count_nonzero(y[block, c:]) == 0, f"switch {switch}: uncovered output channels not 0"
        assert torch.count_nonzero(grad_x[block, c:]) == 0, f"switch {switch}: uncovered grad_x not 0"
        used[rows[s], :c] = True
    assert torch.count_nonzero(grad_w[~used]) == 0, "grad_weight nonzero in unused rows or uncovered channels"
    assert torch.count_nonzero(grad_b[~used]) == 0, "grad_bias nonzero in unused rows or uncovered channels"


# ------------------------------------------------------------------------------ against oracle
# Backends with a native channels_last path or a layout-agnostic one; others are converted by the
# same wrapper code, so the channels_last matrix runs on these only to keep the suite fast.
