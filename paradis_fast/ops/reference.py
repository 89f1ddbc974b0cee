"""The reference implementation: plain PyTorch loops over (switch, sub-network) blocks, with the
paradis ops' arguments, differentiated by autograd itself.

Obviously correct rather than fast: the oracle of the tests (forward and, through autograd, every
gradient) and the `reference` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .plan import conv_output_size, iter_blocks


def _rows(rows_per_switch: int, s: int) -> slice:
    return slice(s * rows_per_switch, (s + 1) * rows_per_switch)


def sliced_conv2d(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared):
    """y[s][:, out] = conv2d(x[s][:, in], weight[out, in]) + bias[out] per block, zero elsewhere."""
    batch = x.shape[0] if input_shared else x.shape[0] // num_switches
    out_hw = [
        conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    ]
    y = x.new_zeros(batch * num_switches, weight.shape[0], *out_hw)
    for s, i0, i1, o0, o1 in iter_blocks(blocks):
        xs = x if input_shared else x[_rows(batch, s)]
        b = None if bias is None else bias[o0:o1]
        y[_rows(batch, s), o0:o1] = F.conv2d(xs[:, i0:i1], weight[o0:o1, i0:i1], b, stride, padding, dilation)
    return y


def depthwise_conv2d(x, weight, bias, stride, padding, dilation):
    return F.conv2d(x, weight, bias, stride, padding, dilation, x.shape[1])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "relu6":
        return F.relu6(z)
    return z


def switch_batch_norm(
    x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, residual=None
):
    """(y, mean, var): switch s normalises its first covered[s] channels with parameter row rows[s]
    (batch statistics when training, running ones otherwise), y = activation(z + residual) and
    activation(residual) on the channels it does not cover (zero without a residual)."""
    num_switches, channels = len(covered), x.shape[1]
    batch, acc = x.shape[0] // num_switches, accumulation_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    y = torch.zeros_like(x) if residual is None else activate(residual, activation).clone()
    mean = x.new_zeros(num_switches, channels, dtype=acc)
    var = x.new_zeros(num_switches, channels, dtype=acc)
    for s, (c, r) in enumerate(zip(covered, rows)):
        xs = x[_rows(batch, s), :c].to(acc)
        if training:
            m, v = xs.mean(dims), xs.var(dims, unbiased=False)
        else:
            m, v = running_mean[r, :c].to(acc), running_var[r, :c].to(acc)
        z = (xs - m.view(shape)) * torch.rsqrt(v + eps).view(shape) * weight[r, :c].to(acc).view(shape)
        z = z + bias[r, :c].to(acc).view(shape)
        if residual is not None:
            z = z + residual[_rows(batch, s), :c].to(acc)
        y[_rows(batch, s), :c] = activate(z, activation).to(x.dtype)
        mean[s, :c], var[s, :c] = m.detach(), v.detach()
    return y, mean, var
