"""The reference backend: plain PyTorch loops over (switch, sub-network) blocks.

Obviously correct rather than fast: the oracle of the tests and the baseline of the benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import conv_output_size, iter_blocks


def unavailable_reason(op: str, device: torch.device) -> str | None:
    return None


def _rows(rows_per_switch: int, s: int) -> slice:
    return slice(s * rows_per_switch, (s + 1) * rows_per_switch)


def sliced_conv2d_forward(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared):
    batch = x.shape[0] if input_shared else x.shape[0] // num_switches
    out_hw = [conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)]
    y = x.new_zeros(batch * num_switches, weight.shape[0], *out_hw)
    for s, i0, i1, o0, o1 in iter_blocks(blocks):
        xs = x if input_shared else x[_rows(batch, s)]
        b = None if bias is None else bias[o0:o1]
        y[_rows(batch, s), o0:o1] = F.conv2d(
            xs[:, i0:i1], weight[o0:o1, i0:i1], b, stride, padding, dilation
        )
    return y


def sliced_conv2d_backward(grad_y, x, weight, blocks, num_switches, stride, padding, dilation, input_shared, output_mask):
    batch = grad_y.shape[0] // num_switches
    grad_x = torch.zeros_like(x) if output_mask[0] else None
    grad_w = torch.zeros_like(weight) if output_mask[1] else None
    grad_b = weight.new_zeros(weight.shape[0]) if output_mask[2] else None
    for s, i0, i1, o0, o1 in iter_blocks(blocks):
        rows = _rows(batch, s)
        x_rows = slice(None) if input_shared else rows
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y[rows, o0:o1], x[x_rows, i0:i1], weight[o0:o1, i0:i1], [o1 - o0],
            stride, padding, dilation, False, [0, 0], 1, list(output_mask),
        )
        if grad_x is not None:
            grad_x[x_rows, i0:i1] += gx
        if grad_w is not None:
            grad_w[o0:o1, i0:i1] += gw
        if grad_b is not None:
            grad_b[o0:o1] += gb
    return grad_x, grad_w, grad_b


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "relu6":
        return F.relu6(z)
    return z


def _normalize(xs, mean, var, weight, bias, eps, activation):
    shape = (1, -1) + (1,) * (xs.dim() - 2)
    z = (xs - mean.view(shape)) * torch.rsqrt(var + eps).view(shape) * weight.view(shape) + bias.view(shape)
    return activate(z, activation)


def _batch_stats(xs):
    dims = [0, *range(2, xs.dim())]
    return xs.mean(dims), xs.var(dims, unbiased=False)


def switch_batch_norm_forward(x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation):
    num_switches, channels = len(covered), x.shape[1]
    batch, acc = x.shape[0] // num_switches, accumulation_dtype(x.dtype)
    y = torch.zeros_like(x)
    mean = x.new_zeros(num_switches, channels, dtype=acc)
    var = x.new_zeros(num_switches, channels, dtype=acc)
    for s, (c, r) in enumerate(zip(covered, rows)):
        xs = x[_rows(batch, s), :c].to(acc)
        if training:
            m, v = _batch_stats(xs)
        else:
            m, v = running_mean[r, :c].to(acc), running_var[r, :c].to(acc)
        y[_rows(batch, s), :c] = _normalize(
            xs, m, v, weight[r, :c].to(acc), bias[r, :c].to(acc), eps, activation
        ).to(x.dtype)
        mean[s, :c], var[s, :c] = m, v
    return y, mean, var


def _activation_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "relu6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    return torch.ones_like(z)


def switch_batch_norm_backward(grad_y, x, weight, bias, mean, var, covered, rows, training, eps, activation):
    """The textbook BatchNorm backward, switch by switch, through the activation's mask."""
    num_switches = len(covered)
    batch, acc = x.shape[0] // num_switches, accumulation_dtype(x.dtype)
    grad_x = torch.zeros_like(x)
    grad_w, grad_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for s, (c, r) in enumerate(zip(covered, rows)):
        block = _rows(batch, s)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        invstd = torch.rsqrt(var[s, :c] + eps).view(shape)
        w, b = weight[r, :c].to(acc).view(shape), bias[r, :c].to(acc).view(shape)
        xhat = (x[block, :c].to(acc) - mean[s, :c].view(shape)) * invstd
        g = grad_y[block, :c].to(acc) * _activation_grad(xhat * w + b, activation)
        sum_g, sum_g_xhat = g.sum(dims), (g * xhat).sum(dims)
        if training:
            count = xhat.numel() // c
            g = g - (sum_g.view(shape) + xhat * sum_g_xhat.view(shape)) / count
        grad_x[block, :c] = (g * w * invstd).to(x.dtype)
        grad_w[r, :c], grad_b[r, :c] = sum_g_xhat.to(weight.dtype), sum_g.to(bias.dtype)
    return grad_x, grad_w, grad_b
