"""Triton kernels for mixed-adapter batched inference (a segmented gather matmul over a pool) and their launcher.

Math and notation: ``naive.py``; batch layout: ``batch.py``.
The layer runs as three launches, Punica's SGMV shrink/expand around a cuBLAS base GEMM:

1. ``y = x W0^T + bias``: cuBLAS ``F.linear`` (BENCH.md: a plain Triton GEMM is 1.12-1.27x cuBLAS at M >= 2048;
   the adapters' bytes, not the base GEMM, are this op's problem).
2. ``multi_lora_shrink_kernel``: ``t[p] = s_p * x[row_p] A_i[:b_p]^T`` for every sorted row ``p`` of every tile
   (rows sharing adapter ``i``), split over K. Grid ``(tiles, rank blocks, K splits)``: each ``A_i`` tile is read once
   per row tile of its segment (once per segment at decode); x rows are gathered through ``sorted_rows``.
3. ``multi_lora_expand_kernel``: ``y[row_p] += t[p] B_i[:, :b]^T`` in place (DoRA slots:
   ``y = g_i * (y - bias + low) + bias``). Grid ``(tiles, N blocks)``: each ``B_i`` column block once per row tile.

Rows without adapter are in no tile: they cost only the base GEMM (a batch with no adapter row launches neither
kernel). The grids are sized by the batch's fixed tile bound (unused tiles exit at their first load), and ranks,
tile extents and slots are read on the device, so the launches need no host-device sync and a CUDA graph captured
on one batch replays any batch copied into it (``AdapterBatch.copy_``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..._triton_utils import dot_precision, rank_block


@triton.jit
def multi_lora_shrink_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    sorted_rows_ptr,
    row_rank_ptr,
    row_scale_ptr,
    tiles_ptr,
    K,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_ts,
    stride_tm,
    stride_tr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """t[split, p, r] = s[row] sum_{k in split} x[row, k] A[slot, r, k] (0 for r >= rank[row]), row = sorted_rows[p].

    Tile ``(slot, start, end, tile_rank)`` covers sorted positions ``[start, end)``; t is float32 [splits, M, R] and
    only ``r < tile_rank`` is written (the expand kernel reads no further). Grid: (tiles, cdiv(R, BLOCK_R), splits).
    """
    p_tile = tiles_ptr + tl.program_id(0).to(tl.int64) * 4
    slot = tl.load(p_tile)
    tile_rank = tl.load(p_tile + 3)
    r_start = tl.program_id(1) * BLOCK_R
    if (slot < 0) | (r_start >= tile_rank):  # an unused tile, or a rank block past every row's rank
        return
    o_p = tl.load(p_tile + 1) + tl.arange(0, BLOCK_M)
    m_p = o_p < tl.load(p_tile + 2)
    o_row = tl.load(sorted_rows_ptr + o_p, mask=m_p, other=0).to(tl.int64)
    o_r = r_start + tl.arange(0, BLOCK_R)
    m_r = o_r < tile_rank
    pid_s = tl.program_id(2)
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    p_x = x_ptr + o_row[:, None] * stride_xm
    p_a = a_ptr + slot.to(tl.int64) * stride_as + o_r[:, None] * stride_ar
    b_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        o_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < k_end
        b_x = tl.load(p_x + o_k[None, :] * stride_xk, mask=m_p[:, None] & m_k[None, :], other=0.0)
        b_a = tl.load(p_a + o_k[None, :] * stride_ak, mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_a), b_acc, input_precision=DOT_PRECISION)
    # Per-row truncated rank (DyLoRA serving) and scale: rows of one tile may ask for different ranks.
    b_rank = tl.load(row_rank_ptr + o_row, mask=m_p, other=0)
    b_scale = tl.load(row_scale_ptr + o_row, mask=m_p, other=0.0)
    b_acc = tl.where(o_r[None, :] < b_rank[:, None], b_acc * b_scale[:, None], 0.0)
    p_t = t_ptr + pid_s.to(tl.int64) * stride_ts + o_p[:, None].to(tl.int64) * stride_tm + o_r[None, :] * stride_tr
    tl.store(p_t, b_acc, mask=m_p[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["num_splits"])  # a loop bound read as a tensor; 1 would become a constexpr
def multi_lora_expand_kernel(
    t_ptr,
    b_ptr,
    y_ptr,
    bias_ptr,
    g_ptr,
    dora_ptr,
    sorted_rows_ptr,
    tiles_ptr,
    N,
    num_splits,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    stride_gs,
    stride_gn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y[row] += sum_splits t[., p, :tile_rank] B[slot, :, :tile_rank]^T; DoRA slot: y = g * (y - bias + that) + bias.

    y holds ``x W0^T + bias`` on entry (cuBLAS) and is updated in place: each row is in exactly one tile, so no two
    programs touch one element. Grid: (tiles, cdiv(N, BLOCK_N)).
    """
    p_tile = tiles_ptr + tl.program_id(0).to(tl.int64) * 4
    slot = tl.load(p_tile)
    if slot < 0:
        return
    tile_rank = tl.load(p_tile + 3)
    o_p = tl.load(p_tile + 1) + tl.arange(0, BLOCK_M)
    m_p = o_p < tl.load(p_tile + 2)
    o_row = tl.load(sorted_rows_ptr + o_p, mask=m_p, other=0).to(tl.int64)
    o_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    slot64 = slot.to(tl.int64)
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Rank chunks up to the tile's largest rank: b = 8 reads half the B bytes of b = 16.
    for r_start in range(0, tile_rank, BLOCK_R):
        o_r = r_start + tl.arange(0, BLOCK_R)
        m_r = o_r < tile_rank
        m_t = m_p[:, None] & m_r[None, :]
        p_t = t_ptr + o_p[:, None].to(tl.int64) * stride_tm + o_r[None, :] * stride_tr
        b_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, num_splits):
            b_t += tl.load(p_t + s * stride_ts, mask=m_t, other=0.0)
        p_b = b_ptr + slot64 * stride_bs + o_n[:, None] * stride_bn + o_r[None, :] * stride_br
        b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0)
        b_acc = tl.dot(b_t.to(b_b.dtype), tl.trans(b_b), b_acc, input_precision=DOT_PRECISION)
    p_y = y_ptr + o_row[:, None] * stride_ym + o_n[None, :] * stride_yn
    m_y = m_p[:, None] & m_n[None, :]
    b_y = tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    if tl.load(dora_ptr + slot) != 0:
        # DoRA: g scales the base term too. y already holds the bias (cuBLAS adds it), so take it out and put it back,
        # as peft does (base_result - bias): one rounding of y more than a bias-free base GEMM, and no extra pass.
        b_g = tl.load(g_ptr + slot64 * stride_gs + o_n * stride_gn, mask=m_n, other=1.0)
        if HAS_BIAS:
            b_bias = tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_y = b_g[None, :] * (b_y - b_bias[None, :] + b_acc) + b_bias[None, :]
        else:
            b_y = b_g[None, :] * (b_y + b_acc)
    else:
        b_y = b_y + b_acc
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


# ----------------------------------------------------------------------------------------------------------------
# Launcher: allocation, tile choice, grid. No validation (the ops layer and AdapterBatch.build did it).
# ----------------------------------------------------------------------------------------------------------------

# Programs the shrink aims for: ~2 per SM, so K splits fill the GPU when the batch has few tiles (one adapter at
# decode: 1 tile). Untuned first pick (no GPU measured yet): see docs/GPU_NOTES.md.
SHRINK_PROGRAMS_PER_SM = 2
MAX_K_SPLITS = 16


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100 SXM: the interpreter's grid then matches what the GPU would run


def _k_splits(tile_slots: int, rank_blocks: int, K: int, block_k: int, device: torch.device) -> int:
    """K splits of the shrink: enough programs for the GPU by the batch's tile *bound*, so the choice (like the grid)
    depends only on the batch's size, never on its contents; at least one BLOCK_K per split."""
    target = SHRINK_PROGRAMS_PER_SM * _sm_count(device)
    return max(1, min(MAX_K_SPLITS, triton.cdiv(K, block_k), triton.cdiv(target, max(1, tile_slots * rank_blocks))))


def multi_lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude_scale: Tensor,
    dora_slots: Tensor,
    row_slot: Tensor,
    row_rank: Tensor,
    row_scale: Tensor,
    sorted_rows: Tensor,
    tiles: Tensor,
    block_m: int,
) -> Tensor:
    """x: [M, K] -> y [M, N] in x's dtype (interface: ``reference.multi_lora.multi_lora_forward``).

    lora_A: [n, R, K], lora_B: [n, N, R] (the pool; any strides), tiles: [T, 4] int32 from ``AdapterBatch``,
    block_m: the batch's rows per tile. ``row_slot`` is not read: the tiles carry the slots.
    """
    M, K = x.shape
    R = lora_A.shape[1]
    N = weight.shape[0]
    y = F.linear(x, weight, bias)
    T = tiles.shape[0]
    if M == 0 or T == 0:
        return y
    if not y.is_contiguous():  # F.linear returns a fresh contiguous y; the expand kernel only needs its strides
        y = y.contiguous()
    precision = dot_precision(x.dtype)
    block_r = rank_block(R)
    block_k = 64 if x.dtype == torch.float32 else 128
    rank_blocks = triton.cdiv(R, block_r)
    splits = _k_splits(T, rank_blocks, K, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_per_split)
    t = torch.empty(splits, M, R, device=x.device, dtype=torch.float32)
    multi_lora_shrink_kernel[(T, rank_blocks, splits)](
        x, lora_A, t, sorted_rows, row_rank, row_scale, tiles, K, k_per_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    block_n = 64 if x.dtype == torch.float32 else 128
    multi_lora_expand_kernel[(T, triton.cdiv(N, block_n))](
        t, lora_B, y, bias if bias is not None else y, magnitude_scale, dora_slots, sorted_rows, tiles, N, splits,
        t.stride(0), t.stride(1), t.stride(2), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
        y.stride(0), y.stride(1), magnitude_scale.stride(0), magnitude_scale.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=4,
    )  # fmt: skip
    return y
