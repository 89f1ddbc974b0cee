"""The float64 oracle of sliced_conv2d and its case builders, shared by the op's tests on every
backend (test_sliced_conv.py, test_gpu.py, the Triton interpreter cases).

The oracle is a block-masked dense convolution: for switch s, the mask M_s[C_out, C_in] is 1 on
the blocks (out_j x in_j) (on the rows out_j for every input with input_shared), and
y_s = conv2d(x_s, weight * M_s, bias * outmask_s). Its gradients come from autograd, so weight
gradients of overlapping blocks of different switches add up as they must.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

from paradis_fast import Switch
from paradis_fast.ops import sliced_conv2d

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


# ------------------------------------------------------------------------------------- oracle
def bounds(switch: str, channels: int) -> list[int]:
    """b_0 = 0, b_j = floor(C * (w_1 + ... + w_j) + 1/2), computed here with exact fractions."""
    out, total = [0], Fraction(0)
    for w in Switch.parse(switch).widths:
        total += w
        out.append(math.floor(channels * total + Fraction(1, 2)))
    return out


def masks(switch: str, c_in: int, c_out: int, input_shared: bool):
    out_b = bounds(switch, c_out)
    in_b = [0] * len(out_b) if input_shared else bounds(switch, c_in)
    mask = torch.zeros(c_out, c_in, dtype=torch.float64)
    out_mask = torch.zeros(c_out, dtype=torch.float64)
    for j in range(len(out_b) - 1):
        in_stop = c_in if input_shared else in_b[j + 1]
        mask[out_b[j] : out_b[j + 1], in_b[j] : in_stop] = 1
        out_mask[out_b[j] : out_b[j + 1]] = 1
    return mask, out_mask


def oracle(x, weight, bias, switches, stride, padding, dilation, input_shared):
    """float64 block-masked dense convolution of every switch, stacked switch-major."""
    c_out, c_in = weight.shape[:2]
    batch = x.shape[0] if input_shared else x.shape[0] // len(switches)
    outputs = []
    for s, switch in enumerate(switches):
        mask, out_mask = masks(switch, c_in, c_out, input_shared)
        xs = x if input_shared else x[s * batch : (s + 1) * batch]
        b = None if bias is None else bias * out_mask
        outputs.append(F.conv2d(xs, weight * mask[:, :, None, None], b, stride, padding, dilation))
    return torch.cat(outputs)


# ------------------------------------------------------------------------------------- helpers
def make_inputs(case, dtype, seed=None):
    g = torch.Generator().manual_seed(case["seed"] if seed is None else seed)
    rows = case["batch"] * (1 if case["input_shared"] else len(case["switches"]))
    x = torch.randn(rows, case["c_in"], *case["hw"], generator=g, dtype=torch.float64)
    weight = torch.randn(case["c_out"], case["c_in"], case["kernel"], case["kernel"], generator=g, dtype=torch.float64)
    bias = torch.randn(case["c_out"], generator=g, dtype=torch.float64) if case["bias"] else None
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), g


def conv_args(case):
    return case["stride"], case["padding"], case["dilation"], case["input_shared"]


def leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


def run_both(case, x, weight, bias, grad_seed_generator):
    """Op on (x, weight, bias) and the float64 oracle on the same values; returns outputs and grads."""
    stride, padding, dilation, shared = conv_args(case)
    xo, wo, bo = leaf(x), leaf(weight), leaf(bias)
    y = sliced_conv2d(xo, wo, bo, case["switches"], stride, padding, dilation, shared)
    grad_y = torch.randn(y.shape, generator=grad_seed_generator, dtype=torch.float64)
    y.backward(grad_y.to(y.dtype))
    xr, wr, br = leaf(x, torch.float64), leaf(weight, torch.float64), leaf(bias, torch.float64)
    yr = oracle(xr, wr, br, case["switches"], stride, padding, dilation, shared)
    yr.backward(grad_y)
    op = (y.detach(), xo.grad, wo.grad, None if bo is None else bo.grad)
    ref = (yr.detach(), xr.grad, wr.grad, None if br is None else br.grad)
    return op, ref


def assert_uncovered_exact_zeros(case, y, grad_x, grad_w, grad_b):
    switches, c_in, c_out = case["switches"], case["c_in"], case["c_out"]
    batch = case["batch"]
    union = torch.zeros(c_out, c_in, dtype=torch.bool)
    for s, switch in enumerate(switches):
        rows = slice(s * batch, (s + 1) * batch)
        out_cov = bounds(switch, c_out)[-1]
        assert torch.count_nonzero(y[rows, out_cov:]) == 0, f"switch {switch}: uncovered output channels not 0"
        assert torch.count_nonzero(y[rows, :out_cov]) > 0
        if not case["input_shared"]:
            in_cov = bounds(switch, c_in)[-1]
            assert torch.count_nonzero(grad_x[rows, in_cov:]) == 0, f"switch {switch}: grad of unread inputs not 0"
        union |= masks(switch, c_in, c_out, case["input_shared"])[0].bool()
    assert torch.count_nonzero(grad_w[~union]) == 0, "weight entries no block uses have a nonzero gradient"
    if grad_b is not None:
        assert torch.count_nonzero(grad_b[~union.any(1)]) == 0


# ------------------------------------------------------------------------------ against oracle
