"""sliced_conv2d — every (switch, sub-network) block of a layer in one op (DESIGN §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, layout, library
from .backends import backend_for
from .plan import conv_blocks, conv_output_size, live_taps, one_tap_dilation
from ..switches import SwitchSetLike

OP = "sliced_conv2d"


@library.register_fake(OP)
def _(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared):
    rows = x.shape[0] * num_switches if input_shared else x.shape[0]
    out_hw = [
        conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    ]
    return layout.empty((rows, weight.shape[0], *out_hw), x)


@library.register_fake(f"{OP}_backward")
def _(grad_y, x, weight, blocks, num_switches, stride, padding, dilation, input_shared, output_mask):
    return library.convolution_grads_like(x, weight, output_mask)


def sliced_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    switches: SwitchSetLike,
    stride=1,
    padding=0,
    dilation=1,
    input_shared: bool = False,
) -> Tensor:
    """Sliced convolution of every switch at once: for switch s and sub-network j,
    ``y[s][:, out_j] = conv2d(x[s][:, in_j], weight[out_j, in_j]) + bias[out_j]``, zero elsewhere.

    x is ``[S*B, C_in, H, W]`` stacked switch-major, or ``[B, C_in, H, W]`` with ``input_shared``
    (the stem: every sub-network reads all input channels). Returns ``[S*B, C_out, H', W']``.
    """
    switches = checks.switch_set(switches)
    signature = _signature(x, weight, bias, switches, stride, padding, dilation, input_shared)
    checked = _CHECKED.get(signature)
    if checked is None:
        checked = _check(x, weight, bias, switches, stride, padding, dilation, input_shared)
        _CHECKED.put(signature, checked)
    taps, stride, padding, dilation, blocks = checked
    op = backend_for(OP, x.device).function(OP)
    return op(x, _cut(weight, taps), bias, blocks, len(switches), stride, padding, dilation, bool(input_shared))


_CHECKED = checks.CheckedCalls()


def _signature(x, weight, bias, switches, stride, padding, dilation, input_shared):
    """Everything `_check` reads; None where the checks must run (a traced call, arguments not
    tensors)."""
    if torch.compiler.is_compiling():
        return None
    try:
        mixed = x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype)
        autocast = mixed and checks.autocast_unifies(x, weight, bias)  # whether mixed dtypes are fine
        tensors = checks.tensor_signature(x, weight, bias)
    except AttributeError:
        return None
    return switches, stride, padding, dilation, bool(input_shared), autocast, tensors


def _check(x, weight, bias, switches, stride, padding, dilation, input_shared):
    """Validates a call; returns what the op takes from it: (the kernel's live taps (`live_kernel`),
    stride, padding, dilation, block table)."""
    checks.tensors(OP, x=x, weight=weight, bias=bias)
    if not checks.autocast_unifies(x, weight, bias):
        checks.same_dtype(OP, x=x, weight=weight, bias=bias)
    checks.rank(OP, "x", x, 4, "4-D [S*B, C_in, H, W]")
    checks.rank(OP, "weight", weight, 4, "4-D [C_out, C_in, kh, kw]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP}: x has {x.shape[1]} channels but weight expects {weight.shape[1]} (channel mismatch)")
    stride, padding = checks.pair(OP, "stride", stride, 1), checks.pair(OP, "padding", padding, 0)
    dilation = checks.pair(OP, "dilation", dilation, 1)
    if not input_shared:
        checks.batch_divisible(OP, x.shape[0], len(switches))
    for d in range(2):
        if conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) < 1:
            raise ValueError(f"{OP}: input of spatial size {tuple(x.shape[2:])} is smaller than the kernel")
    taps, padding = live_kernel(x, weight, stride, padding, dilation)
    dilation = one_tap_dilation(_cut(weight, taps).shape[2:], dilation)
    blocks = conv_blocks(switches, weight.shape[1], weight.shape[0], bool(input_shared))
    return taps, stride, padding, dilation, blocks


def cut_kernel(x: Tensor, weight: Tensor, stride: list, padding: list, dilation: list) -> tuple[Tensor, list]:
    """weight without the taps that read only padding for every output (`live_taps`), and the
    padding that goes with it: a 3x3 layer on 1-pixel images is a 1x1 layer, 9x less arithmetic."""
    taps, padding = live_kernel(x, weight, stride, padding, dilation)
    return _cut(weight, taps), padding


def live_kernel(x: Tensor, weight: Tensor, stride: list, padding: list, dilation: list) -> tuple[tuple | None, list]:
    """The ranges (h0, h1, w0, w1) of the kernel's live taps, None where every tap is, and the padding
    that goes with them."""
    (h0, h1, ph), (w0, w1, pw) = (
        live_taps(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    )
    if (h1 - h0, w1 - w0) == tuple(weight.shape[2:]):
        return None, padding
    return (h0, h1, w0, w1), [ph, pw]


def _cut(weight: Tensor, taps: tuple | None) -> Tensor:
    """A view, so autograd gives the cut taps their zero gradient."""
    return weight if taps is None else weight[:, :, taps[0] : taps[1], taps[2] : taps[3]]
