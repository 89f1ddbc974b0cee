"""Triton kernels of paradis::switch_batch_norm: BatchNorm + activation with statistics per
(switch, channel) over switch-major stacked activations x = [S*B, C, HW].

The work of a (switch, channel) pair, its B*HW values, is split into `chunks` so that the grid
fills the GPU whatever S*C is. Forward in training: one launch writes the Welford partials
(mean, M2) of every chunk; one launch normalises, each program first merging its pair's partials
exactly (Chan's formula over all chunks, in a fixed order: deterministic). Backward likewise: the
partial sums of g and g*xhat, then grad_x. Uncovered channels come out exactly zero. The host
functions take and return what paradis_fast.ops.reference's do; the running-statistics update is
done once for every backend by paradis_fast.ops.switch_bn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import accumulation_type, check_int32_span, device_table, on_device, split_evenly

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}
MAX_BLOCK = 1024  # values per tile of a program's loop
# Not tuned yet (no GPU has run these kernels): several programs per SM of a 132-SM H100.
TARGET_PROGRAMS = 2048  # chunks per pair are chosen to reach about this many programs


@triton.jit
def _offsets(s, c, i, B, C, HW):
    """Offsets in x = [S*B, C, HW] of values i (over B*HW) of switch s, channel c; int64 rows."""
    b = i // HW
    return ((s * B + b).to(tl.int64) * C + c) * HW + (i - b * HW)


@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    return z


@triton.jit
def _passes_grad(z, ACT: tl.constexpr):
    """Where the activation passes the gradient (strictly inside its linear piece)."""
    if ACT == 1:
        return z > 0.0
    elif ACT == 2:
        return (z > 0.0) & (z < 6.0)
    else:
        return z == z


@triton.jit
def _chunk_sizes(k, CHUNKS, chunk, M, ACC: tl.constexpr):
    """Values in each chunk k of a pair (0 past the last chunk)."""
    return tl.where(k < CHUNKS, tl.minimum(chunk, M - k * chunk), 0).to(ACC)


@triton.jit
def _welford_partials_kernel(
    x_ptr,  # [S*B, C, HW] contiguous
    partials_ptr,  # [S*C, CHUNKS, 2] ACC out: mean and M2 of each chunk
    covered_ptr,  # [S] int64: channels switch s covers
    B,
    C,
    HW,
    chunk,
    CHUNKS,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair, k = tl.program_id(0), tl.program_id(1)
    s, c = pair // C, pair % C
    start = k * chunk
    stop = tl.minimum(start + chunk, B * HW)
    stop = tl.where(c < tl.load(covered_ptr + s), stop, start)  # uncovered: nothing to read
    count = tl.full((), 0.0, ACC)
    mean = tl.full((), 0.0, ACC)
    m2 = tl.full((), 0.0, ACC)
    for i0 in range(start, stop, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < stop
        v = tl.load(x_ptr + _offsets(s, c, i, B, C, HW), mask=mask, other=0.0).to(ACC)
        n = tl.sum(mask.to(ACC), 0)
        tile_mean = tl.sum(v, 0) / n
        d = tl.where(mask, v - tile_mean, 0.0)
        total = count + n
        delta = tile_mean - mean
        mean += delta * (n / total)
        m2 += tl.sum(d * d, 0) + delta * delta * (count * n / total)
        count = total
    out = partials_ptr + (pair * CHUNKS + k) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _normalize_kernel(
    x_ptr,
    y_ptr,  # [S*B, C, HW] contiguous
    weight_ptr,
    bias_ptr,
    running_mean_ptr,
    running_var_ptr,  # [S_total, C]
    partials_ptr,  # [S*C, CHUNKS, 2] ACC: Welford partials (read when TRAINING)
    mean_ptr,
    var_ptr,  # [S, C] ACC out: the statistics used
    covered_ptr,
    rows_ptr,  # [S] int64: channels covered, parameter row of switch s
    B,
    C,
    HW,
    chunk,
    CHUNKS,
    eps,
    TRAINING: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair, k = tl.program_id(0), tl.program_id(1)
    s, c = pair // C, pair % C
    covered = c < tl.load(covered_ptr + s)
    p = tl.load(rows_ptr + s) * C + c
    if TRAINING:  # Chan's merge of the chunks' (count, mean, M2), all at once
        ks = tl.arange(0, CHUNKS_P2)
        n = _chunk_sizes(ks, CHUNKS, chunk, B * HW, ACC)
        part = partials_ptr + (pair * CHUNKS + ks) * 2
        means = tl.load(part, mask=ks < CHUNKS, other=0.0)
        m2s = tl.load(part + 1, mask=ks < CHUNKS, other=0.0)
        mean = tl.sum(n * means, 0) / (B * HW)
        d = means - mean
        var = tl.sum(m2s + n * d * d, 0) / (B * HW)
    else:
        mean = tl.load(running_mean_ptr + p).to(ACC)
        var = tl.load(running_var_ptr + p).to(ACC)
    mean = tl.where(covered, mean, 0.0)
    var = tl.where(covered, var, 0.0)
    if k == 0:
        tl.store(mean_ptr + pair, mean)
        tl.store(var_ptr + pair, var)
    # y = act(x * scale + shift); zero scale and shift give act(0) = 0 on uncovered channels
    scale = tl.load(weight_ptr + p).to(ACC) / tl.sqrt(var + eps)
    shift = tl.load(bias_ptr + p).to(ACC) - mean * scale
    scale = tl.where(covered, scale, 0.0)
    shift = tl.where(covered, shift, 0.0)
    start = k * chunk
    stop = tl.minimum(start + chunk, B * HW)
    read_stop = tl.where(covered, stop, start)  # uncovered: write zeros, read nothing
    for i0 in range(start, stop, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        offsets = _offsets(s, c, i, B, C, HW)
        v = tl.load(x_ptr + offsets, mask=i < read_stop, other=0.0).to(ACC)
        tl.store(y_ptr + offsets, _activate(v * scale + shift, ACT), mask=i < stop)


@triton.jit
def _grad_partials_kernel(
    grad_y_ptr,
    x_ptr,  # [S*B, C, HW] contiguous
    weight_ptr,
    bias_ptr,  # [S_total, C]
    mean_ptr,
    var_ptr,  # [S, C] ACC: the statistics of the forward
    partials_ptr,  # [S*C, CHUNKS, 2] ACC out: sums of g and g*xhat of each chunk
    covered_ptr,
    rows_ptr,  # [S] int64
    B,
    C,
    HW,
    chunk,
    CHUNKS,
    eps,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair, k = tl.program_id(0), tl.program_id(1)
    s, c = pair // C, pair % C
    p = tl.load(rows_ptr + s) * C + c
    mean = tl.load(mean_ptr + pair).to(ACC)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + pair).to(ACC) + eps)
    w = tl.load(weight_ptr + p).to(ACC)
    b = tl.load(bias_ptr + p).to(ACC)
    start = k * chunk
    stop = tl.minimum(start + chunk, B * HW)
    stop = tl.where(c < tl.load(covered_ptr + s), stop, start)
    sum_g = tl.full((), 0.0, ACC)
    sum_g_xhat = tl.full((), 0.0, ACC)
    for i0 in range(start, stop, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        mask = i < stop
        offsets = _offsets(s, c, i, B, C, HW)
        xhat = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - mean) * invstd
        g = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(ACC)
        g = tl.where(mask & _passes_grad(xhat * w + b, ACT), g, 0.0)
        sum_g += tl.sum(g, 0)
        sum_g_xhat += tl.sum(g * xhat, 0)
    out = partials_ptr + (pair * CHUNKS + k) * 2
    tl.store(out, sum_g)
    tl.store(out + 1, sum_g_xhat)


@triton.jit
def _grad_input_kernel(
    grad_y_ptr,
    x_ptr,
    grad_x_ptr,  # [S*B, C, HW] contiguous
    weight_ptr,
    bias_ptr,  # [S_total, C]
    grad_weight_ptr,
    grad_bias_ptr,  # [S_total, C] out (zero-initialised: rows no switch uses)
    mean_ptr,
    var_ptr,  # [S, C] ACC
    partials_ptr,  # [S*C, CHUNKS, 2] ACC: sums of g and g*xhat of each chunk
    covered_ptr,
    rows_ptr,  # [S] int64
    B,
    C,
    HW,
    chunk,
    CHUNKS,
    eps,
    TRAINING: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair, k = tl.program_id(0), tl.program_id(1)
    s, c = pair // C, pair % C
    covered = c < tl.load(covered_ptr + s)
    p = tl.load(rows_ptr + s) * C + c
    ks = tl.arange(0, CHUNKS_P2)
    part = partials_ptr + (pair * CHUNKS + ks) * 2
    sum_g = tl.sum(tl.load(part, mask=ks < CHUNKS, other=0.0), 0)
    sum_g_xhat = tl.sum(tl.load(part + 1, mask=ks < CHUNKS, other=0.0), 0)
    if k == 0:
        tl.store(grad_weight_ptr + p, sum_g_xhat)
        tl.store(grad_bias_ptr + p, sum_g)
    mean = tl.load(mean_ptr + pair).to(ACC)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + pair).to(ACC) + eps)
    w = tl.load(weight_ptr + p).to(ACC)
    b = tl.load(bias_ptr + p).to(ACC)
    scale = tl.where(covered, w * invstd, 0.0)
    # grad_x = scale * (g - sum_g / M - xhat * sum_g_xhat / M): batch statistics depend on x
    proj = 0.0
    offset = 0.0
    if TRAINING:
        proj = scale * sum_g_xhat / (B * HW)
        offset = scale * sum_g / (B * HW)
    start = k * chunk
    stop = tl.minimum(start + chunk, B * HW)
    read_stop = tl.where(covered, stop, start)
    for i0 in range(start, stop, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        offsets = _offsets(s, c, i, B, C, HW)
        xhat = (tl.load(x_ptr + offsets, mask=i < read_stop, other=0.0).to(ACC) - mean) * invstd
        g = tl.load(grad_y_ptr + offsets, mask=i < read_stop, other=0.0).to(ACC)
        g = tl.where(_passes_grad(xhat * w + b, ACT), g, 0.0)
        grad_x = tl.where(covered, g * scale - xhat * proj - offset, 0.0)
        tl.store(grad_x_ptr + offsets, grad_x, mask=i < stop)


def chunking(pairs: int, per_pair: int, chunks: int | None = None):
    """(BLOCK, chunk, chunks): each pair's values split into `chunks` runs of `chunk` values."""
    if chunks is None:
        chunks = min(triton.cdiv(per_pair, MAX_BLOCK), max(1, TARGET_PROGRAMS // pairs))
    chunk, chunks = split_evenly(per_pair, chunks, MAX_BLOCK)
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(chunk))), chunk, chunks


def _geometry(x: torch.Tensor, covered, rows, activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"switch_batch_norm: unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    num_switches, channels = len(covered), x.shape[1]
    batch, hw = x.shape[0] // num_switches, x[0, 0].numel()
    check_int32_span("switch_batch_norm", "one (switch, channel) pair", batch * hw)
    tables = device_table(tuple(covered), x.device), device_table(tuple(rows), x.device)
    return num_switches, batch, channels, hw, tables


def switch_batch_norm_forward(
    x, weight, bias, running_mean, running_var, covered, rows, training, eps, activation, chunks=None
):
    """(y, mean, var) as paradis_fast.ops.reference.switch_batch_norm_forward; `chunks` overrides
    how many programs share one (switch, channel) pair (tests use it to exercise the merge)."""
    x = x.contiguous()
    num_switches, batch, channels, hw, (covered_t, rows_t) = _geometry(x, covered, rows, activation)
    acc = accumulation_type(x.dtype)
    stats_dtype = torch.float64 if acc == tl.float64 else torch.float32
    y = torch.empty_like(x)
    mean = torch.empty(num_switches, channels, dtype=stats_dtype, device=x.device)
    var = torch.empty_like(mean)
    pairs = num_switches * channels
    block, chunk, chunks = chunking(pairs, batch * hw, chunks)
    partials = torch.empty(pairs, chunks, 2, dtype=stats_dtype, device=x.device)
    params = [t.contiguous() for t in (weight, bias, running_mean, running_var)]
    with on_device(x):
        if training:
            _welford_partials_kernel[(pairs, chunks)](
                x, partials, covered_t, batch, channels, hw, chunk, chunks, ACC=acc, BLOCK=block
            )
        _normalize_kernel[(pairs, chunks)](
            x,
            y,
            *params,
            partials,
            mean,
            var,
            covered_t,
            rows_t,
            batch,
            channels,
            hw,
            chunk,
            chunks,
            eps,
            TRAINING=bool(training),
            ACT=ACTIVATIONS[activation],
            ACC=acc,
            CHUNKS_P2=triton.next_power_of_2(chunks),
            BLOCK=block,
        )
    return y, mean, var


def switch_batch_norm_backward(
    grad_y, x, weight, bias, mean, var, covered, rows, training, eps, activation, chunks=None
):
    """(grad_x, grad_weight, grad_bias) as paradis_fast.ops.reference.switch_batch_norm_backward."""
    x, grad_y = x.contiguous(), grad_y.contiguous()
    num_switches, batch, channels, hw, (covered_t, rows_t) = _geometry(x, covered, rows, activation)
    acc = accumulation_type(x.dtype)
    weight, bias, mean, var = (t.contiguous() for t in (weight, bias, mean, var))
    grad_x = torch.empty_like(x)
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    pairs = num_switches * channels
    block, chunk, chunks = chunking(pairs, batch * hw, chunks)
    partials = torch.empty(pairs, chunks, 2, dtype=mean.dtype, device=x.device)
    common = (covered_t, rows_t, batch, channels, hw, chunk, chunks, eps)
    with on_device(x):
        _grad_partials_kernel[(pairs, chunks)](
            grad_y,
            x,
            weight,
            bias,
            mean,
            var,
            partials,
            *common,
            ACT=ACTIVATIONS[activation],
            ACC=acc,
            BLOCK=block,
        )
        _grad_input_kernel[(pairs, chunks)](
            grad_y,
            x,
            grad_x,
            weight,
            bias,
            grad_weight,
            grad_bias,
            mean,
            var,
            partials,
            *common,
            TRAINING=bool(training),
            ACT=ACTIVATIONS[activation],
            ACC=acc,
            CHUNKS_P2=triton.next_power_of_2(chunks),
            BLOCK=block,
        )
    return grad_x, grad_weight, grad_bias
