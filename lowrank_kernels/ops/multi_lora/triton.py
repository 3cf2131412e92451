"""Triton kernels of the multi-adapter gather matmul (segmented over the batch's rows grouped by adapter).

Math and notation: ``naive.py``; batch layout: ``batch.py``; the one forward/backward over these primitives:
``op.py``. A layer runs Punica's SGMV shrink/expand around a cuBLAS base GEMM, and its backward adds two segmented
weight-gradient launches:

1. ``y = x W0^T + bias`` (and ``dy W0`` in the backward): cuBLAS ``F.linear`` (the adapters' bytes, not the base
   GEMM, are this op's problem).
2. ``multi_lora_shrink_kernel`` (``segment_shrink``): ``t[row] = s_row * drop(x[row]) A_i[:b_row]^T`` for every row
   of every tile (rows sharing adapter ``i``), split over K. Grid ``(tiles, rank blocks, K splits)``: each ``A_i``
   tile is read once per row tile of its segment; x rows are gathered through ``sorted_rows``.
3. ``multi_lora_expand_kernel`` (``segment_expand``): ``y[row] += t[row] B_i[:, :b]^T`` in place, with DoRA's
   epilogues (serving and training forms) and the backward's dropout mask. Grid ``(tiles, N blocks)``.
4. ``segment_weight_grad_kernel``: per slot ``out_i = sum_{rows of i} u[row]^T drop(v[row])``. Grid
   ``(capacity, P blocks, Q blocks)``: one program owns one output tile of one adapter and walks that adapter's
   segment once, in a fixed order, accumulating in fp32: deterministic, no atomics, zero for slots no row uses.

Rows without adapter are in no tile: they cost only the base GEMM. The grids are sized by the batch's fixed tile
bound and the pool's capacity (unused tiles exit at their first load), and ranks, tile extents and slots are read
on the device, so the launches need no host-device sync and a CUDA graph captured on one batch replays any batch
copied into it (``AdapterBatch.copy_``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._triton_utils import cdiv, dot_precision, dropout_keep, rank_block, traceable
from ..lora.naive import keep_factor
from .naive import BatchTensors


@triton.jit(do_not_specialize=["seed"])
def multi_lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, sorted_rows_ptr, row_rank_ptr, row_scale_ptr, tiles_ptr,
    K, k_per_split, seed, p_drop, drop_scale,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_ts, stride_tm, stride_tr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """t[split, row, r] = s[row] sum_{k in split} drop(x)[row, k] A[slot, r, k] (0 for r >= rank[row]).

    Tile ``(slot, start, end, tile_rank)`` covers sorted positions ``[start, end)``, rows ``sorted_rows[p]``; t is
    float32 [splits, M, R], indexed by row, and only ``r < tile_rank`` is written (the caller zeroes it).
    Dropout: x's dropped entries are zeroed (exact) and the accumulator scaled by 1/(1-p) (``drop_scale``).
    Grid: (tiles, cdiv(R, BLOCK_R), splits).
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
        if HAS_DROPOUT:
            b_x = tl.where(dropout_keep(seed, p_drop, o_row, o_k, K), b_x, 0.0)
        b_a = tl.load(p_a + o_k[None, :] * stride_ak, mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_a.to(b_x.dtype)), b_acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        b_acc = b_acc * drop_scale
    # Per-row truncated rank (DyLoRA) and scale: rows of one tile may ask for different ranks.
    b_rank = tl.load(row_rank_ptr + o_row, mask=m_p, other=0)
    b_scale = tl.load(row_scale_ptr + o_row, mask=m_p, other=0.0)
    b_acc = tl.where(o_r[None, :] < b_rank[:, None], b_acc * b_scale[:, None], 0.0)
    p_t = t_ptr + pid_s.to(tl.int64) * stride_ts + o_row[:, None] * stride_tm + o_r[None, :] * stride_tr
    tl.store(p_t, b_acc, mask=m_p[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["seed", "num_splits"])  # a loop bound read as a tensor; 1 would become a constexpr
def multi_lora_expand_kernel(
    t_ptr, b_ptr, y_ptr, bias_ptr, g_ptr, dora_ptr, yd_ptr, z_ptr, sorted_rows_ptr, tiles_ptr,
    N, num_splits, seed, p_drop, drop_scale,
    stride_ts, stride_tm, stride_tr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn, stride_gs, stride_gn,
    stride_ydm, stride_ydn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, HAS_DORA: tl.constexpr, HAS_YD: tl.constexpr, SAVE_Z: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """y[row] += low = t[row, :tile_rank] B[slot, :, :tile_rank]^T, in place (``naive.segment_expand``).

    t: float32 [num_splits, M, R], the shrink's K-split partials, summed here (serving reads them unreduced).

    HAS_DROPOUT: ``low`` times the [M, N] dropout mask (the backward's dx). HAS_DORA, on DoRA slots: without HAS_YD
    ``z = y - bias + low``, ``y = g z + bias``; with it (``yd = drop(x) W0^T``) ``z = yd + low``,
    ``y = y + (g - 1) yd + g low``; SAVE_Z stores z. Each row is in exactly one tile, so no two programs touch one
    element. Grid: (tiles, cdiv(N, BLOCK_N)).
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
        p_t = t_ptr + o_row[:, None] * stride_tm + o_r[None, :] * stride_tr
        b_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for s in range(0, num_splits):
            b_t += tl.load(p_t + s * stride_ts, mask=m_p[:, None] & m_r[None, :], other=0.0)
        p_b = b_ptr + slot64 * stride_bs + o_n[:, None] * stride_bn + o_r[None, :] * stride_br
        b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0)
        b_acc = tl.dot(b_t.to(b_b.dtype), tl.trans(b_b), b_acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        b_acc = tl.where(dropout_keep(seed, p_drop, o_row, o_n, N), b_acc * drop_scale, 0.0)
    p_y = y_ptr + o_row[:, None] * stride_ym + o_n[None, :] * stride_yn
    m_y = m_p[:, None] & m_n[None, :]
    b_y = tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
    if HAS_DORA:
        is_dora = tl.load(dora_ptr + slot) != 0
    else:
        is_dora = slot < 0  # False: a LoRA-only launch reads no DoRA table
    if is_dora:
        b_g = tl.load(g_ptr + slot64 * stride_gs + o_n * stride_gn, mask=m_n, other=1.0)[None, :]
        if HAS_YD:
            b_yd = tl.load(yd_ptr + o_row[:, None] * stride_ydm + o_n[None, :] * stride_ydn, mask=m_y, other=0.0)
            b_yd = b_yd.to(tl.float32)
            b_z = b_yd + b_acc
            b_y = b_y + (b_g - 1.0) * b_yd + b_g * b_acc
        else:
            # y already holds the bias (cuBLAS adds it), so take it out and put it back, as peft does.
            if HAS_BIAS:
                b_bias = tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
                b_z = b_y - b_bias + b_acc
                b_y = b_g * b_z + b_bias
            else:
                b_z = b_y + b_acc
                b_y = b_g * b_z
        if SAVE_Z:
            tl.store(z_ptr + o_row[:, None] * stride_zm + o_n[None, :] * stride_zn,
                     b_z.to(z_ptr.dtype.element_ty), mask=m_y)  # fmt: skip
    else:
        b_y = b_y + b_acc
    tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit(do_not_specialize=["seed"])
def segment_weight_grad_kernel(
    u_ptr, v_ptr, out_ptr, sorted_rows_ptr, slot_rows_ptr,
    P, Q, seed, p_drop, drop_scale,
    stride_um, stride_up, stride_vm, stride_vq, stride_os, stride_op, stride_oq,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    """out[slot, p, q] = sum over the slot's segment of u[row, p] drop(v)[row, q], fp32, one program per tile.

    The segment ``[start, end)`` of ``sorted_rows`` is walked BLOCK_M rows at a time in order (deterministic); an
    unused slot (start == end) stores zeros. Grid: (capacity, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q)).
    """
    slot = tl.program_id(0).to(tl.int64)
    start = tl.load(slot_rows_ptr + slot * 2)
    end = tl.load(slot_rows_ptr + slot * 2 + 1)
    o_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_q = tl.program_id(2).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p = o_p < P
    m_q = o_q < Q
    b_acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m_start in range(start, end, BLOCK_M):
        o_s = m_start + tl.arange(0, BLOCK_M)
        m_s = o_s < end
        o_row = tl.load(sorted_rows_ptr + o_s, mask=m_s, other=0).to(tl.int64)
        b_u = tl.load(u_ptr + o_row[:, None] * stride_um + o_p[None, :] * stride_up, mask=m_s[:, None] & m_p[None, :],
                      other=0.0).to(tl.float32)  # fmt: skip
        b_v = tl.load(v_ptr + o_row[:, None] * stride_vm + o_q[None, :] * stride_vq, mask=m_s[:, None] & m_q[None, :],
                      other=0.0).to(tl.float32)  # fmt: skip
        if HAS_DROPOUT:
            b_v = tl.where(dropout_keep(seed, p_drop, o_row, o_q, Q), b_v, 0.0)
        b_acc = tl.dot(tl.trans(b_u), b_v, b_acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        b_acc = b_acc * drop_scale
    p_out = out_ptr + slot * stride_os + o_p[:, None] * stride_op + o_q[None, :] * stride_oq
    tl.store(p_out, b_acc, mask=m_p[:, None] & m_q[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers: allocation, tile choice, grid. No validation (the ops layer and AdapterBatch.build did it).
# ----------------------------------------------------------------------------------------------------------------

# Programs the shrink aims for: ~2 per SM, so K splits fill the GPU when the batch has few tiles (one adapter at
# decode: 1 tile). Untuned first pick (no GPU measured yet).
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
    return max(1, min(MAX_K_SPLITS, cdiv(K, block_k), cdiv(target, max(1, tile_slots * rank_blocks))))


def _dropout_args(p_drop: float) -> tuple[float, float]:
    return (p_drop, keep_factor(p_drop)) if p_drop > 0.0 else (0.0, 1.0)


def shrink_partials(x: Tensor, a: Tensor, meta: BatchTensors, *, p_drop: float = 0.0, seed: int = 0,
                    zeroed: bool = True) -> Tensor:  # fmt: skip
    """The shrink's K-split partials, float32 [splits, M, R] (their sum is ``segment_shrink``). Split over K when
    the batch has few tiles; ``zeroed``: entries no tile writes (rows without adapter, ranks past a tile's) are 0,
    else unwritten (the expand reads none of them)."""
    M, K = x.shape
    R = a.shape[1]
    T = meta.tiles.shape[0]
    block_r = rank_block(R)
    # 64-row tiles: 64-wide K tiles (128 wide, 3 stages, rank tile 16: a cold 1-STL spill at 64 registers on sm_80,
    # Triton 3.9; 64 wide: none on 3.6 or 3.9 at rank tiles 16-64, aot_check)
    block_k = 64 if x.dtype == torch.float32 or meta.block_m >= 64 else 128
    rank_blocks = cdiv(R, block_r)
    splits = _k_splits(T, rank_blocks, K, block_k, x.device)
    k_per_split = cdiv(cdiv(K, splits), block_k) * block_k
    splits = cdiv(K, k_per_split)
    t = (torch.zeros if zeroed else torch.empty)(splits, M, R, device=x.device, dtype=torch.float32)
    if T == 0 or M == 0:
        return t
    p, scale = _dropout_args(p_drop)
    traceable(multi_lora_shrink_kernel)[(T, rank_blocks, splits)](
        x, a, t, meta.sorted_rows, meta.row_rank, meta.row_scale, meta.tiles, K, k_per_split, seed, p, scale,
        *x.stride(), a.stride(0), a.stride(1), a.stride(2), t.stride(0), t.stride(1), t.stride(2),
        HAS_DROPOUT=p_drop > 0.0, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=meta.block_m, BLOCK_K=block_k,
        BLOCK_R=block_r, num_warps=8 if meta.block_m >= 64 else 4,  # 64-row tiles spill on 4 warps (aot_check)
    )  # fmt: skip
    return t


def segment_shrink(x: Tensor, a: Tensor, meta: BatchTensors, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] float32 = s_t drop(x[t]) a[i_t, :b_t]^T, zero past b_t and on rows without adapter (``naive``'s).

    x: [M, K], a: [n, R, K] (any strides). The K splits are summed in a fixed order (deterministic)."""
    t = shrink_partials(x, a, meta, p_drop=p_drop, seed=seed)
    return t[0] if t.shape[0] == 1 else t.sum(0)


def segment_expand(y, t, u, meta: BatchTensors, *, p_drop=0.0, seed=0, dora=None, bias=None, yd=None,
                   save_z=False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(y + low, z | None) as ``naive.segment_expand``, y updated in place (a fresh product from the caller).

    y: [M, N]; t: [M, R] float32 (or the shrink's [splits, M, R] partials); u: [n, N, R] (any strides);
    dora: (g [n, N], dora_slots [n]) | None."""
    M, N = y.shape
    R = u.shape[2]
    T = meta.tiles.shape[0]
    t = t if t.dim() == 3 else t.unsqueeze(0)
    z = torch.zeros_like(y) if save_z else None
    if T == 0 or M == 0:
        return y, z
    block_r = rank_block(R)
    # 128 columns spilled at 64 rows x rank tile 64 (3 STL at 128 registers on sm_80, Triton 3.6) and beside the
    # dropout epilogue's hash at 16 rows (1 STL at 72 on sm_90, Triton 3.9; aot_check); 64 wide: 48-114, none
    block_n = 64 if y.dtype == torch.float32 or p_drop > 0.0 or (meta.block_m >= 64 and block_r >= 64) else 128
    g, dora_slots = dora if dora is not None else (y, meta.row_slot)  # unread without HAS_DORA
    p, scale = _dropout_args(p_drop)
    yd_t = y if yd is None else yd
    z_t = y if z is None else z
    traceable(multi_lora_expand_kernel)[(T, cdiv(N, block_n))](
        t, u, y, bias if bias is not None else y, g, dora_slots, yd_t, z_t, meta.sorted_rows, meta.tiles, N, t.shape[0],
        seed, p, scale, t.stride(0), t.stride(1), t.stride(2), u.stride(0), u.stride(1), u.stride(2), y.stride(0),
        y.stride(1),
        g.stride(0), g.stride(1) if g.dim() == 2 else 0, *yd_t.stride(), *z_t.stride(),
        HAS_BIAS=bias is not None, HAS_DORA=dora is not None, HAS_YD=yd is not None, SAVE_Z=z is not None,
        HAS_DROPOUT=p_drop > 0.0, DOT_PRECISION=dot_precision(y.dtype), BLOCK_M=meta.block_m, BLOCK_N=block_n,
        BLOCK_R=block_r, num_warps=8 if meta.block_m >= 64 else 4,  # 64-row tiles spill on 4 warps (aot_check)
    )  # fmt: skip
    return y, z


def segment_weight_grad(u: Tensor, v: Tensor, meta: BatchTensors, capacity: int, *, p_drop: float = 0.0,
                        seed: int = 0) -> Tensor:  # fmt: skip
    """[capacity, P, Q] float32: per slot, the sum over its rows of ``u[t]^T drop(v[t])`` (``naive``'s), each
    output tile accumulated by one program over its adapter's segment (deterministic, no atomics)."""
    M, P = u.shape
    Q = v.shape[1]
    out = torch.empty(capacity, P, Q, device=u.device, dtype=torch.float32)
    block_p = 64 if P > 32 else (32 if P > 16 else 16)
    block_q = 64 if Q > 32 else (32 if Q > 16 else 16)
    p, scale = _dropout_args(p_drop)
    fp32 = u.dtype == torch.float32 or v.dtype == torch.float32
    traceable(segment_weight_grad_kernel)[(capacity, cdiv(P, block_p), cdiv(Q, block_q))](
        u, v, out, meta.sorted_rows, meta.slot_rows, P, Q, seed, p, scale, *u.stride(), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), out.stride(2), HAS_DROPOUT=p_drop > 0.0,
        DOT_PRECISION=dot_precision(torch.float32 if fp32 else u.dtype), BLOCK_M=32, BLOCK_P=block_p,
        BLOCK_Q=block_q, num_warps=8 if p_drop > 0.0 or fp32 else 4,  # aot_check: on 4 warps the mask's hash
        # spills, and so do fp32 products on FFMA (a float32 t with 16-bit x: 255 registers, 132-140 STL at 64 x 64)
    )  # fmt: skip
    return out


def serving_forward(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, meta: BatchTensors) -> Tensor:
    """The forward without autograd (no xa kept, no dropout): the expand sums the shrink's K-split partials itself,
    so a decode step is three launches (GEMM, shrink, expand), as CUDA-graph replays want. y [M, N]."""
    y = torch.nn.functional.linear(x, weight, bias)
    t = shrink_partials(x, lora_A, meta, zeroed=False)
    y, _ = segment_expand(y, t, lora_B, meta, dora=(magnitude_scale, dora_slots), bias=bias)
    return y


def multi_lora_forward(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, row_slot, row_rank, row_scale,
                       sorted_rows, tiles, block_m) -> Tensor:  # fmt: skip
    """Serving forward with the gather-bmm's interface (``naive.multi_lora_forward``)."""
    slot_rows = torch.zeros(lora_A.shape[0], 2, dtype=torch.int32, device=x.device)  # unread by the forward
    meta = BatchTensors(row_slot, row_rank, row_scale, sorted_rows, tiles, slot_rows, block_m)
    return serving_forward(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, meta)
