"""Triton kernels of paradis::sliced_conv2d: every (switch, sub-network) block of a layer in one
launch, as a variable-size grouped implicit GEMM (DESIGN §3).

Each launch reads a device-side tile table built once per layer shape (int64, cached): the host
lists the output tiles of every GEMM problem, problems ordered by work descending so the largest
start first and the tail stays short (the scheduler of Triton's tutorial 08 / CUTLASS grouped
GEMM, with the table precomputed instead of searched). A tile names the reduction segments it sums:

- forward: a problem per block, y[s][:, out_j] += x[s][:, in_j] (*) w[out_j, in_j], one segment;
- grad-input: a problem per input slice, summing the output slices that read it (one for stacked
  inputs; every block of every switch for the shared stem input), so no two programs write the
  same grad_x element;
- grad-weight: a tile of the weight matrix [C_out, C_in*KH*KW] sums every block that overlaps it,
  switch after switch, in a fixed order (deterministic, no atomics); optional split-K partials are
  summed by one torch reduction.

Rows of activations use int64 offsets; offsets inside one sample stay int32 (checked). Products
accumulate in fp32 (fp64 for fp64 inputs, without tensor cores). fp32 GEMMs use TF32 when
torch.backends.cudnn.allow_tf32 is set, as PyTorch's own convolutions do.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from paradis_fast.ops.plan import conv_output_size, iter_blocks

from . import accumulation_type, check_int32_span, device_table, on_device, split_evenly

# Fields of the schedule tables (flat int64 arrays on the device). Forward and input gradient: a
# tile is (output switch, first and stop output column, first and stop segment), a segment the
# (input switch, first and stop reduction channel) it reads; weight gradient: a tile is (first
# output channel, first column, first and stop segment), a segment (grad_y switch, x switch,
# output channels start and stop, columns start and stop). Kernels read them as constexprs; host
# code takes .value.
TILE_FIELDS = tl.constexpr(5)
SEGMENT_FIELDS = tl.constexpr(3)
WEIGHT_TILE_FIELDS = tl.constexpr(4)
WEIGHT_SEGMENT_FIELDS = tl.constexpr(6)
# Not tuned yet (no GPU has run these kernels): several programs per SM of a 132-SM H100.
TARGET_PROGRAMS = 1024  # grad-weight splits the pixel reduction to reach about this many programs


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b: tensor cores for fp32/fp16/bf16, a plain product-sum for fp64."""
    if USE_DOT:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], 1)
    return acc


@triton.jit
def _forward_kernel(
    x_ptr,  # [S_x*B, C_in, H, W] contiguous; S_x = 1 when the input is shared
    w_ptr,  # [C_out, C_in, KH, KW] contiguous
    bias_ptr,  # [C_out] (read only with HAS_BIAS)
    y_ptr,  # [S*B, C_out, OH, OW] contiguous out
    tiles_ptr,  # [T, 5] int64: switch of y, first and stop output channel, segment range
    segments_ptr,  # [G, 3] int64: switch of x, first and stop input channel
    num_m_tiles,
    B,
    C_in,
    H,
    W,
    C_out,
    OH,
    OW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = tiles_ptr + (pid // num_m_tiles) * TILE_FIELDS
    m = (pid % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels (b, oh, ow)
    n = tl.load(tile + 1) + tl.arange(0, BLOCK_N)  # output channels
    m_ok = m < B * OH * OW
    n_ok = n < tl.load(tile + 2)
    b, r = m // (OH * OW), m % (OH * OW)
    oh, ow = r // OW, r % OW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for g in range(tl.load(tile + 3), tl.load(tile + 4)):
        segment = segments_ptr + g * SEGMENT_FIELDS
        c_stop = tl.load(segment + 2)
        x_rows = (tl.load(segment) * B + b).to(tl.int64) * (C_in * H * W)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh * stride_h - pad_h + kh * dil_h
                iw = ow * stride_w - pad_w + kw * dil_w
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_pix = x_rows + ih * W + iw
                for c0 in range(tl.load(segment + 1), c_stop, BLOCK_K):
                    c = c0 + tl.arange(0, BLOCK_K)  # input channels
                    c_ok = c < c_stop
                    a = tl.load(
                        x_ptr + x_pix[:, None] + c[None, :] * (H * W), mask=pix_ok[:, None] & c_ok[None, :], other=0.0
                    )
                    w = tl.load(
                        w_ptr + n[None, :] * (C_in * KH * KW) + c[:, None] * (KH * KW) + (kh * KW + kw),
                        mask=c_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    acc = _mma(acc, a, w, USE_DOT, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(ACC)[None, :]
    y_rows = (tl.load(tile) * B + b).to(tl.int64) * (C_out * OH * OW) + r
    tl.store(
        y_ptr + y_rows[:, None] + n[None, :] * (OH * OW),
        acc.to(y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _grad_input_kernel(
    grad_y_ptr,  # [S*B, C_out, OH, OW] contiguous
    w_ptr,  # [C_out, C_in, KH, KW] contiguous
    grad_x_ptr,  # [S_x*B, C_in, H, W] contiguous out
    tiles_ptr,  # [T, 5] int64: switch of x, first and stop input channel, segment range
    segments_ptr,  # [G, 3] int64: switch of grad_y, first and stop output channel
    num_m_tiles,
    B,
    C_in,
    H,
    W,
    C_out,
    OH,
    OW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = tiles_ptr + (pid // num_m_tiles) * TILE_FIELDS
    m = (pid % num_m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)  # input pixels (b, ih, iw)
    n = tl.load(tile + 1) + tl.arange(0, BLOCK_N)  # input channels
    m_ok = m < B * H * W
    n_ok = n < tl.load(tile + 2)
    b, r = m // (H * W), m % (H * W)
    ih, iw = r // W, r % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for g in range(tl.load(tile + 3), tl.load(tile + 4)):
        segment = segments_ptr + g * SEGMENT_FIELDS
        c_stop = tl.load(segment + 2)
        gy_rows = (tl.load(segment) * B + b).to(tl.int64) * (C_out * OH * OW)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                # the output pixel that read (ih, iw) through tap (kh, kw), if the stride hits it
                th = ih + pad_h - kh * dil_h
                tw = iw + pad_w - kw * dil_w
                oh, ow = th // stride_h, tw // stride_w
                pix_ok = m_ok & (th >= 0) & (tw >= 0) & (oh * stride_h == th) & (ow * stride_w == tw)
                pix_ok = pix_ok & (oh < OH) & (ow < OW)
                gy_pix = gy_rows + oh * OW + ow
                for c0 in range(tl.load(segment + 1), c_stop, BLOCK_K):
                    c = c0 + tl.arange(0, BLOCK_K)  # output channels
                    c_ok = c < c_stop
                    a = tl.load(
                        grad_y_ptr + gy_pix[:, None] + c[None, :] * (OH * OW),
                        mask=pix_ok[:, None] & c_ok[None, :],
                        other=0.0,
                    )
                    w = tl.load(
                        w_ptr + c[:, None] * (C_in * KH * KW) + n[None, :] * (KH * KW) + (kh * KW + kw),
                        mask=c_ok[:, None] & n_ok[None, :],
                        other=0.0,
                    )
                    acc = _mma(acc, a, w, USE_DOT, PRECISION)
    x_rows = (tl.load(tile) * B + b).to(tl.int64) * (C_in * H * W) + r
    tl.store(
        grad_x_ptr + x_rows[:, None] + n[None, :] * (H * W),
        acc.to(grad_x_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _grad_weight_kernel(
    grad_y_ptr,  # [S*B, C_out, OH, OW] contiguous
    x_ptr,  # [S_x*B, C_in, H, W] contiguous
    out_ptr,  # [SPLITS, C_out, C_in*KH*KW] out: grad_weight itself when SPLITS is 1, else partials
    tiles_ptr,  # [T, 4] int64: first output channel, first column, segment range
    segments_ptr,  # [G, 6] int64: switch of grad_y, switch of x, output channel range, column range
    pixels_per_split,
    B,
    C_in,
    H,
    W,
    C_out,
    OH,
    OW,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACC: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tiles_ptr + tl.program_id(0) * WEIGHT_TILE_FIELDS
    split = tl.program_id(1)
    o = tl.load(tile) + tl.arange(0, BLOCK_M)  # output channels
    q = tl.load(tile + 1) + tl.arange(0, BLOCK_N)  # columns (input channel, kh, kw)
    i, kk = q // (KH * KW), q % (KH * KW)
    kh, kw = kk // KW, kk % KW
    p_start = split * pixels_per_split
    p_stop = tl.minimum(p_start + pixels_per_split, B * OH * OW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for g in range(tl.load(tile + 2), tl.load(tile + 3)):  # the blocks overlapping this tile
        segment = segments_ptr + g * WEIGHT_SEGMENT_FIELDS
        s_y, s_x = tl.load(segment), tl.load(segment + 1)
        o_ok = (o >= tl.load(segment + 2)) & (o < tl.load(segment + 3))
        q_ok = (q >= tl.load(segment + 4)) & (q < tl.load(segment + 5))
        for p0 in range(p_start, p_stop, BLOCK_K):
            p = p0 + tl.arange(0, BLOCK_K)  # output pixels (b, oh, ow) of switch s_y
            p_ok = p < p_stop
            b, r = p // (OH * OW), p % (OH * OW)
            oh, ow = r // OW, r % OW
            gy_rows = (s_y * B + b).to(tl.int64) * (C_out * OH * OW) + r
            a = tl.load(
                grad_y_ptr + gy_rows[None, :] + o[:, None] * (OH * OW), mask=o_ok[:, None] & p_ok[None, :], other=0.0
            )
            ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
            iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
            ok = p_ok[:, None] & q_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = (s_x * B + b).to(tl.int64) * (C_in * H * W)
            xt = tl.load(x_ptr + x_rows[:, None] + i[None, :] * (H * W) + ih * W + iw, mask=ok, other=0.0)
            acc = _mma(acc, a, xt, USE_DOT, PRECISION)
    columns = C_in * KH * KW
    out = out_ptr + split.to(tl.int64) * (C_out * columns) + o[:, None] * columns + q[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(o < C_out)[:, None] & (q < columns)[None, :])


# ------------------------------------------------------------------------------------ schedule
def _grouped_tiles(problems, block_n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Flat tile and segment tables of (switch, n_start, n_stop, segments) GEMM problems, the
    problems ordered by work (columns x reduction channels) descending, ties in given order."""

    def work(problem):
        _, n_start, n_stop, segments = problem
        return (n_stop - n_start) * sum(k_stop - k_start for _, k_start, k_stop in segments)

    tiles, segments = [], []
    for switch, n_start, n_stop, problem_segments in sorted(problems, key=work, reverse=True):
        first = len(segments) // SEGMENT_FIELDS.value
        for segment in problem_segments:
            segments += segment
        for n0 in range(n_start, n_stop, block_n):
            tiles += [switch, n0, n_stop, first, first + len(problem_segments)]
    return tuple(tiles), tuple(segments)


@functools.lru_cache(maxsize=1024)
def forward_schedule(blocks: tuple[int, ...], input_shared: bool, block_n: int):
    """One problem per block: y[s][:, out_j] from x[s][:, in_j] (x[:, in_j] when shared)."""
    problems = [(s, o0, o1, ((0 if input_shared else s, i0, i1),)) for s, i0, i1, o0, o1 in iter_blocks(blocks)]
    return _grouped_tiles(problems, block_n)


@functools.lru_cache(maxsize=1024)
def grad_input_schedule(blocks: tuple[int, ...], input_shared: bool, block_n: int):
    """One problem per distinct input slice, summing every output slice that reads it."""
    readers: dict[tuple[int, int, int], list] = {}
    for s, i0, i1, o0, o1 in iter_blocks(blocks):
        readers.setdefault((0 if input_shared else s, i0, i1), []).append((s, o0, o1))
    problems = [(x_switch, i0, i1, tuple(segs)) for (x_switch, i0, i1), segs in readers.items()]
    return _grouped_tiles(problems, block_n)


@functools.lru_cache(maxsize=1024)
def grad_weight_schedule(
    blocks: tuple[int, ...], input_shared: bool, taps: int, c_out: int, c_in: int, block_m: int, block_n: int
):
    """Tiles of the weight matrix [C_out, C_in*taps] that some block overlaps, each listing those
    blocks in switch order; tiles with more blocks (more work) first."""
    rects = [(s, 0 if input_shared else s, o0, o1, i0 * taps, i1 * taps) for s, i0, i1, o0, o1 in iter_blocks(blocks)]
    work = []
    for m0 in range(0, c_out, block_m):
        for n0 in range(0, c_in * taps, block_n):
            over = [r for r in rects if r[2] < m0 + block_m and m0 < r[3] and r[4] < n0 + block_n and n0 < r[5]]
            if over:
                work.append((m0, n0, over))
    tiles, segments = [], []
    for m0, n0, over in sorted(work, key=lambda t: len(t[2]), reverse=True):
        first = len(segments) // WEIGHT_SEGMENT_FIELDS.value
        tiles += [m0, n0, first, first + len(over)]
        for rect in over:
            segments += rect
    return tuple(tiles), tuple(segments)


@functools.lru_cache(maxsize=1024)
def output_coverage(blocks: tuple[int, ...], num_switches: int, c_out: int) -> tuple[tuple[bool, ...], ...]:
    """[S][C_out]: which output channels each switch computes (the others stay zero)."""
    covered = [[False] * c_out for _ in range(num_switches)]
    for s, _, _, o0, o1 in iter_blocks(blocks):
        covered[s][o0:o1] = [True] * (o1 - o0)
    return tuple(map(tuple, covered))


# ------------------------------------------------------------------------------------ launches
class _Geometry(NamedTuple):
    batch: int
    c_in: int
    h: int
    w: int
    c_out: int
    oh: int
    ow: int
    kh: int
    kw: int


def _geometry(x, weight, num_switches, stride, padding, dilation, input_shared) -> tuple[_Geometry, tuple]:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"sliced_conv2d: the triton kernels take float16/bfloat16/float32/float64, got {x.dtype}")
    batch = x.shape[0] if input_shared else x.shape[0] // num_switches
    c_out, c_in, kh, kw = weight.shape
    oh, ow = (
        conv_output_size(x.shape[2 + d], weight.shape[2 + d], stride[d], padding[d], dilation[d]) for d in range(2)
    )
    geometry = _Geometry(batch, c_in, x.shape[2], x.shape[3], c_out, oh, ow, kh, kw)
    for what, size in (
        ("one input sample", c_in * x.shape[2] * x.shape[3]),
        ("one output sample", c_out * oh * ow),
        ("the weight", weight.numel()),
        ("one switch's input pixels", batch * x.shape[2] * x.shape[3]),
        ("one switch's output pixels", batch * oh * ow),
    ):
        check_int32_span("sliced_conv2d", what, size)
    conv = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    return geometry, conv


def _gemm_options(x: torch.Tensor) -> dict:
    acc = accumulation_type(x.dtype)
    precision = "tf32" if x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"
    return dict(ACC=acc, USE_DOT=acc != tl.float64, PRECISION=precision)


def _block(widest: int, cap: int, dtype: torch.dtype) -> int:
    """A power-of-two tile side, at least 16 (tl.dot), no wider than needed; 16 for fp64."""
    return 16 if dtype == torch.float64 else max(16, min(cap, triton.next_power_of_2(widest)))


def sliced_conv2d_forward(x, weight, bias, blocks, num_switches, stride, padding, dilation, input_shared):
    """y as paradis_fast.ops.reference.sliced_conv2d_forward, in one launch."""
    x, weight = x.contiguous(), weight.contiguous()
    g, conv = _geometry(x, weight, num_switches, stride, padding, dilation, input_shared)
    blocks = tuple(blocks)
    widths = [(o1 - o0, i1 - i0) for _, i0, i1, o0, o1 in iter_blocks(blocks)]
    block_m = _block(g.batch * g.oh * g.ow, 64, x.dtype)
    block_n = _block(max(w for w, _ in widths), 64, x.dtype)
    block_k = _block(max(k for _, k in widths), 32, x.dtype)
    tiles, segments = forward_schedule(blocks, bool(input_shared), block_n)
    full = all(all(row) for row in output_coverage(blocks, num_switches, g.c_out))
    shape = (g.batch * num_switches, g.c_out, g.oh, g.ow)
    y = x.new_empty(shape) if full else x.new_zeros(shape)
    num_m_tiles = triton.cdiv(g.batch * g.oh * g.ow, block_m)
    with on_device(x):
        _forward_kernel[(num_m_tiles * (len(tiles) // TILE_FIELDS.value),)](
            x,
            weight,
            bias if bias is not None else weight,
            y,
            device_table(tiles, x.device),
            device_table(segments, x.device),
            num_m_tiles,
            g.batch,
            g.c_in,
            g.h,
            g.w,
            g.c_out,
            g.oh,
            g.ow,
            *conv,
            KH=g.kh,
            KW=g.kw,
            HAS_BIAS=bias is not None,
            **_gemm_options(x),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
    return y


def _grad_input(grad_y, weight, x, g, conv, blocks, input_shared):
    widths = [(i1 - i0, o1 - o0) for _, i0, i1, o0, o1 in iter_blocks(blocks)]
    block_m = _block(g.batch * g.h * g.w, 64, x.dtype)
    block_n = _block(max(w for w, _ in widths), 64, x.dtype)
    block_k = _block(max(k for _, k in widths), 32, x.dtype)
    tiles, segments = grad_input_schedule(blocks, bool(input_shared), block_n)
    # the input slices read, per switch of x (one switch when shared); a switch's slices are disjoint
    read = {(0 if input_shared else s, i0, i1) for s, i0, i1, _, _ in iter_blocks(blocks)}
    everything_read = sum(i1 - i0 for _, i0, i1 in read) == g.c_in * (x.shape[0] // g.batch)
    grad_x = torch.empty_like(x) if everything_read else torch.zeros_like(x)
    num_m_tiles = triton.cdiv(g.batch * g.h * g.w, block_m)
    _grad_input_kernel[(num_m_tiles * (len(tiles) // TILE_FIELDS.value),)](
        grad_y,
        weight,
        grad_x,
        device_table(tiles, x.device),
        device_table(segments, x.device),
        num_m_tiles,
        g.batch,
        g.c_in,
        g.h,
        g.w,
        g.c_out,
        g.oh,
        g.ow,
        *conv,
        KH=g.kh,
        KW=g.kw,
        **_gemm_options(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return grad_x


def _grad_weight(grad_y, x, weight, g, conv, blocks, input_shared, splits):
    taps = g.kh * g.kw
    block_m = _block(g.c_out, 64, x.dtype)
    block_n = _block(g.c_in * taps, 64, x.dtype)
    block_k = _block(g.batch * g.oh * g.ow, 32, x.dtype)
    tiles, segments = grad_weight_schedule(blocks, bool(input_shared), taps, g.c_out, g.c_in, block_m, block_n)
    num_tiles, pixels = len(tiles) // WEIGHT_TILE_FIELDS.value, g.batch * g.oh * g.ow
    if splits is None:  # split the pixel reduction when the weight has too few tiles to fill the GPU
        splits = max(1, min(TARGET_PROGRAMS // num_tiles, triton.cdiv(pixels, 8 * block_k)))
    pixels_per_split, splits = split_evenly(pixels, splits, block_k)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros((splits, *weight.shape), dtype=weight.dtype if splits == 1 else acc, device=x.device)
    _grad_weight_kernel[(num_tiles, splits)](
        grad_y,
        x,
        out,
        device_table(tiles, x.device),
        device_table(segments, x.device),
        pixels_per_split,
        g.batch,
        g.c_in,
        g.h,
        g.w,
        g.c_out,
        g.oh,
        g.ow,
        *conv,
        KH=g.kh,
        KW=g.kw,
        **_gemm_options(x),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out[0] if splits == 1 else out.sum(0).to(weight.dtype)


def _grad_bias(grad_y, blocks, num_switches, c_out, dtype):
    """Sum over the switches of each switch's gradient on the channels it computes (plain torch)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_switch = grad_y.unflatten(0, (num_switches, -1)).sum((1, 3, 4), dtype=acc)
    coverage = output_coverage(blocks, num_switches, c_out)
    covered = device_table(sum(coverage, ()), grad_y.device).view(num_switches, c_out) != 0
    return torch.where(covered, per_switch, 0).sum(0).to(dtype)


def sliced_conv2d_backward(
    grad_y, x, weight, blocks, num_switches, stride, padding, dilation, input_shared, output_mask, splits=None
):
    """(grad_x, grad_weight, grad_bias) as paradis_fast.ops.reference.sliced_conv2d_backward; a
    launch each. `splits` overrides the split-K of grad_weight (tests use it)."""
    grad_y, x, weight = grad_y.contiguous(), x.contiguous(), weight.contiguous()
    g, conv = _geometry(x, weight, num_switches, stride, padding, dilation, input_shared)
    blocks = tuple(blocks)
    grads = [None, None, None]
    with on_device(x):
        if output_mask[0]:
            grads[0] = _grad_input(grad_y, weight, x, g, conv, blocks, input_shared)
        if output_mask[1]:
            grads[1] = _grad_weight(grad_y, x, weight, g, conv, blocks, input_shared, splits)
        if output_mask[2]:
            grads[2] = _grad_bias(grad_y, blocks, num_switches, g.c_out, weight.dtype)
    return tuple(grads)
