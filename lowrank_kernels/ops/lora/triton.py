"""LoRA / DyLoRA on Triton: the primitives ``shrink``, ``lowrank_matmul``, ``weight_grad`` (interface and math:
``naive.py``) and the one-launch decode override ``fused_forward``. Four kernels:

- ``lora_shrink_kernel``:  ``t = drop(x) A[:b]^T``              (forward ``xa``; backward ``dyb = dy B[:, :b]``)
- ``lora_matmul_kernel``:  ``y = x W^T + bias + s (t * v) U^T``  (forward ``y``; backward ``dx``), the low-rank
  term added in the GEMM epilogue. At decode sizes it also computes ``t`` itself, so the forward is one launch.
  Optionally (DoRA) a per-column output scale, a second accumulator for ``drop(x) W^T`` and the pre-scale sum ``z``.
- ``lowrank_epilogue_kernel``: the same epilogue in place after a cuBLAS base GEMM (DoRA above M = 64).
- ``lora_weight_grad_kernel``: ``out = s v * t^T drop(x)``     (``dA`` and ``dB^T``), split over M.

The active rank ``b`` is a runtime argument everywhere: masked loads and runtime loop bounds, never a
``tl.constexpr``, so changing it never recompiles and the bytes read track ``b``. Dropout masks are a pure
function of ``(seed, row, column)`` (a counter hash), so the backward regenerates the forward's mask, never saves it.
The primitives check nothing the op already checked; they allocate, pick tiles and launch.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._triton_utils import (
    cdiv,
    dot_precision,
    dropout_keep,
    grouped_program,
    next_power_of_2,
    pipeline_stages,
    rank_block,
    row_splits,
    traceable,
)

# Forward at M <= 64 runs as one launch that also computes xa; it keeps xa for all ranks in registers.
FUSED_SHRINK_MAX_M = 64
FUSED_SHRINK_MAX_RANK = 128
# Above this M the base GEMM goes to cuBLAS and the low-rank term is added by an in-place rank-b addmm: a plain
# Triton GEMM was measured at 1.12-1.27x cuBLAS for M >= 2048 on an H100 (0.95-1.06x for M <= 64), so until our
# own GEMM is measured at least as fast, cuBLAS + epilogue is the safer prediction. LOWRANK_KERNELS_LORA_GEMM=triton
# or =cublas forces one strategy (the benchmarks time both). Unmeasured: see docs/GPU_NOTES.md.
CUBLAS_GEMM_MIN_M = 65
GEMM_ENV_VAR = "LOWRANK_KERNELS_LORA_GEMM"
# Split-M weight gradients: at least this many rows per split (~2 programs per SM on an H100 otherwise). Tests lower
# it so that several splits run on small shapes.
WEIGHT_GRAD_MIN_ROWS = 256


def use_cublas_gemm(M: int) -> bool:
    """Whether the base GEMM of an M-row call goes to cuBLAS (then low-rank epilogue) or to our fused kernel."""
    choice = os.environ.get(GEMM_ENV_VAR, "auto").strip().lower()
    if choice not in ("auto", "triton", "cublas"):
        raise ValueError(f"{GEMM_ENV_VAR} must be auto, triton or cublas, got {choice!r}")
    return choice == "cublas" or (choice == "auto" and M >= CUBLAS_GEMM_MIN_M)


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def dropout_mask_kernel(
    out_ptr,
    seed, M, K, p_drop,
    stride_om, stride_ok,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Materialise the dropout mask the other kernels apply (tests and debugging only)."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_mask = tl.where(dropout_keep(seed, p_drop, o_m, o_k, K), 1.0 / (1.0 - p_drop), 0.0)
    p_out = out_ptr + o_m[:, None] * stride_om + o_k[None, :] * stride_ok
    tl.store(p_out, b_mask, mask=(o_m[:, None] < M) & (o_k[None, :] < K))


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    seed, M, K, R, rank, p_drop,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """t[m, r] = sum_k drop(x)[m, k] A[r, k] for r < rank, 0 for rank <= r < R; t is float32 [M, R].

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    r_start = tl.program_id(1) * BLOCK_R
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = r_start + tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < rank
    b_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # Rank blocks wholly past the active rank skip the K loop and only write their zeros.
    k_end = tl.where(r_start < rank, K, 0)
    for k_start in range(0, k_end, BLOCK_K):
        o_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        p_x = x_ptr + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if HAS_DROPOUT:
            b_x = tl.where(dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
        p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_a), b_acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        b_acc *= 1.0 / (1.0 - p_drop)
    p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
    tl.store(p_t, b_acc, mask=m_m[:, None] & (o_r[None, :] < R))


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def lora_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, u_ptr, v_ptr, a_ptr, y_ptr, cs_num_ptr, cs_den_ptr, xd_ptr, z_ptr,
    seed, M, N, K, rank, scale, p_drop,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_un, stride_ur, stride_ar, stride_ak,
    stride_ym, stride_yn, stride_xdm, stride_xdk, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, HAS_RANK_SCALE: tl.constexpr, FUSE_SHRINK: tl.constexpr, SHRINK_DROPOUT: tl.constexpr,
    EPILOGUE_DROPOUT: tl.constexpr, HAS_COL_SCALE: tl.constexpr, DROPPED_X: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """y = x W^T (+ bias) + scale * ((t * v)[:, :rank] U[:, :rank]^T) [* dropout mask], fp32 accumulation.

    x: [M, K], W: [N, K], U: [N, >=rank], t: [M, >=rank] float32, v: [>=rank], y: [M, N].
    FUSE_SHRINK: t = drop(x) A[:rank]^T is accumulated in the main loop from the same x tiles (BLOCK_R covers
    every rank) and the programs of column block 0 write it to t_ptr for the backward.
    EPILOGUE_DROPOUT: the low-rank term (only) is multiplied by the dropout mask at (m, n) -- the backward's dx.
    HAS_COL_SCALE: the sum (x W^T + low-rank) is multiplied by ``g[n] = num[n] / den[n]`` before the bias (DoRA's
    ``m / ||W0 + s B A||``; the ratio is taken here so a cached norm costs no extra launch).
    DROPPED_X (not with FUSE_SHRINK): a second accumulator takes ``drop(x) W^T`` from the same W tiles, reading
    ``xd`` = x with its dropped entries zeroed (unscaled; 1/(1-p) is applied to the accumulator), and
    ``y = (x - drop(x)) W^T + g * (drop(x) W^T + low-rank) + bias`` (DoRA's dropout form, peft's
    ``x W0^T + (g - 1) drop(x) W0^T + g s ...``).
    STORE_Z: ``z`` (the sum before g: ``x W^T + low-rank``, with DROPPED_X ``drop(x) W^T + low-rank``) is stored to
    z_ptr: DoRA's magnitude gradient reads it (saving z rather than y leaves y free for in-place ops).
    xd is an input, not a mask drawn here: every column block would redraw the same [BLOCK_M, K] mask, N / BLOCK_N
    hashes per element (estimate: at M = 2048 on 4096x4096, 270M hashes of ~25 integer ops, several GEMMs' time).
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped by GROUP_M row blocks so W tiles stay in L2.
    """
    tl.static_assert(not (DROPPED_X and FUSE_SHRINK), "DROPPED_X reads xd; the fused shrink draws its own mask")
    pid_m, pid_n = grouped_program(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPPED_X:
        b_acc_drop = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_SHRINK:
        o_ra = tl.arange(0, BLOCK_R)
        b_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        o_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(
            x_ptr + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0
        )
        b_w = tl.load(
            w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk, mask=m_n[:, None] & m_k[None, :], other=0.0
        )
        b_acc = tl.dot(b_x, tl.trans(b_w), b_acc, input_precision=DOT_PRECISION)
        if DROPPED_X:
            b_xd = tl.load(
                xd_ptr + o_m[:, None] * stride_xdm + o_k[None, :] * stride_xdk,
                mask=m_m[:, None] & m_k[None, :],
                other=0.0,
            )
            b_acc_drop = tl.dot(b_xd, tl.trans(b_w), b_acc_drop, input_precision=DOT_PRECISION)
        if FUSE_SHRINK:
            if SHRINK_DROPOUT:
                b_x = tl.where(dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
            p_a = a_ptr + o_ra[:, None] * stride_ar + o_k[None, :] * stride_ak
            b_a = tl.load(p_a, mask=(o_ra[:, None] < rank) & m_k[None, :], other=0.0)
            b_t = tl.dot(b_x, tl.trans(b_a), b_t, input_precision=DOT_PRECISION)

    if DROPPED_X:
        # From here b_acc is drop(x) W^T, the part the low-rank term joins and g scales; the rest is added at the end.
        b_acc_drop *= 1.0 / (1.0 - p_drop)
        b_rest = b_acc - b_acc_drop
        b_acc = b_acc_drop
    if FUSE_SHRINK:
        if SHRINK_DROPOUT:
            b_t *= 1.0 / (1.0 - p_drop)
        if pid_n == 0:
            p_t = t_ptr + o_m[:, None] * stride_tm + o_ra[None, :] * stride_tr
            tl.store(p_t, b_t, mask=m_m[:, None] & (o_ra[None, :] < rank))
        if HAS_RANK_SCALE:
            b_t *= tl.load(v_ptr + o_ra, mask=o_ra < rank, other=0.0).to(tl.float32)[None, :]
        b_u = tl.load(
            u_ptr + o_n[:, None] * stride_un + o_ra[None, :] * stride_ur,
            mask=m_n[:, None] & (o_ra[None, :] < rank),
            other=0.0,
        )
        b_acc = tl.dot((b_t * scale).to(b_u.dtype), tl.trans(b_u), b_acc, input_precision=DOT_PRECISION)
    else:
        if EPILOGUE_DROPOUT:
            b_low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            b_low = b_acc
        # Rank chunks up to the runtime rank: b=8 reads half the U bytes of b=16 and compiles nothing new.
        for r_start in range(0, rank, BLOCK_R):
            o_r = r_start + tl.arange(0, BLOCK_R)
            m_r = o_r < rank
            b_t = tl.load(
                t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr, mask=m_m[:, None] & m_r[None, :], other=0.0
            )
            if HAS_RANK_SCALE:
                b_t *= tl.load(v_ptr + o_r, mask=m_r, other=0.0).to(tl.float32)[None, :]
            b_u = tl.load(
                u_ptr + o_n[:, None] * stride_un + o_r[None, :] * stride_ur, mask=m_n[:, None] & m_r[None, :], other=0.0
            )
            b_low = tl.dot((b_t * scale).to(b_u.dtype), tl.trans(b_u), b_low, input_precision=DOT_PRECISION)
        if EPILOGUE_DROPOUT:
            b_acc += tl.where(dropout_keep(seed, p_drop, o_m, o_n, N), b_low * (1.0 / (1.0 - p_drop)), 0.0)
        else:
            b_acc = b_low

    if STORE_Z:
        p_z = z_ptr + o_m[:, None] * stride_zm + o_n[None, :] * stride_zn
        tl.store(p_z, b_acc.to(z_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])
    if HAS_COL_SCALE:
        b_num = tl.load(cs_num_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_den = tl.load(cs_den_ptr + o_n, mask=m_n, other=1.0).to(tl.float32)
        b_acc *= tl.div_rn(b_num, b_den)[None, :]  # IEEE division: m / norm is exactly 1 when m == norm
    if DROPPED_X:
        b_acc += b_rest
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def lora_weight_grad_kernel(
    t_ptr, x_ptr, v_ptr, out_ptr,
    seed, M, K, rank_start, rank, rows_per_split, scale, p_drop,
    stride_tm, stride_tr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    HAS_RANK_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[s, r - rank_start, k] = scale * v[r] * sum_{m in split s} t[m, r] drop(x)[m, k], rank_start <= r < rank.

    t: [M, >=rank] float32, x: [M, K], out: [splits, rank - rank_start, K] float32 (summed over s by the launcher).
    Grid: (cdiv(K, BLOCK_K), cdiv(rank - rank_start, BLOCK_R), splits).
    """
    o_k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = rank_start + tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    pid_s = tl.program_id(2)
    m_k = o_k < K
    m_r = o_r < rank
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    b_acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m_start in range(m_begin, m_end, BLOCK_M):
        o_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < m_end
        b_t = tl.load(
            t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr, mask=m_m[:, None] & m_r[None, :], other=0.0
        )
        b_x = tl.load(
            x_ptr + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0
        )
        if HAS_DROPOUT:
            b_x = tl.where(dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
        b_acc = tl.dot(tl.trans(b_t.to(b_x.dtype)), b_x, b_acc, input_precision=DOT_PRECISION)
    b_scale = tl.zeros((BLOCK_R,), tl.float32) + scale / (1.0 - p_drop)  # p_drop = 0 without dropout
    if HAS_RANK_SCALE:
        b_scale *= tl.load(v_ptr + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_acc *= b_scale[:, None]
    p_out = out_ptr + pid_s * stride_os + (o_r - rank_start)[:, None] * stride_or + o_k[None, :] * stride_ok
    tl.store(p_out, b_acc, mask=m_r[:, None] & m_k[None, :])


@triton.jit
def lowrank_epilogue_kernel(
    y_ptr, t_ptr, u_ptr, num_ptr, den_ptr, bias_ptr, z_ptr,
    M, N, rank, scale,
    stride_ym, stride_yn, stride_tm, stride_tr, stride_un, stride_ur, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """In place after cuBLAS: z = y + scale * t[:, :rank] U[:, :rank]^T, y = g * z + bias, g = num / den (fp32).

    y: [M, N] (holds x W0^T), t: [M, >=rank] float32, U: [N, >=rank], num, den, bias: [N]; z: [M, N] (STORE_Z).
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]
    p_y = y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn
    b_acc = tl.load(p_y, mask=m_mn, other=0.0).to(tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        o_r = r_start + tl.arange(0, BLOCK_R)
        m_r = o_r < rank
        p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
        b_t = tl.load(p_t, mask=m_m[:, None] & m_r[None, :], other=0.0)
        p_u = u_ptr + o_n[:, None] * stride_un + o_r[None, :] * stride_ur
        b_u = tl.load(p_u, mask=m_n[:, None] & m_r[None, :], other=0.0)
        b_acc = tl.dot((b_t * scale).to(b_u.dtype), tl.trans(b_u), b_acc, input_precision=DOT_PRECISION)
    if STORE_Z:
        p_z = z_ptr + o_m[:, None] * stride_zm + o_n[None, :] * stride_zn
        tl.store(p_z, b_acc.to(z_ptr.dtype.element_ty), mask=m_mn)
    b_num = tl.load(num_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_den = tl.load(den_ptr + o_n, mask=m_n, other=1.0).to(tl.float32)
    b_acc *= tl.div_rn(b_num, b_den)[None, :]
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_mn)


# ---------------------------------------------------------------------------------------------------------------
# The primitives (interface and math: ``naive.py``): allocation, tile choice, grid. No validation: the op did it.
# ---------------------------------------------------------------------------------------------------------------


def _matmul_tiles(M: int, dtype: torch.dtype, fused_rank_block: int, two_accumulators: bool = False) -> dict:
    """``_tiles``, cached (read, never mutated: copy before changing it). ``int(M)``: a traced (dynamic) M is a
    SymInt, which the cache cannot hash; the tiles specialise on M anyway."""
    return _tiles(int(M), dtype, fused_rank_block, two_accumulators)


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments, on every launch's host path
def _tiles(M: int, dtype: torch.dtype, fused_rank_block: int, two_accumulators: bool) -> dict:
    """Tiles of lora_matmul_kernel. Untuned first picks (no GPU measured yet, see docs/GPU_NOTES.md).

    ``fused_rank_block``: rows of A streamed beside W when the shrink is fused (0 otherwise). The pipeline depth
    is the most stages (<= 4) whose x, W (and A) tiles fit the shared-memory budget. ``two_accumulators``
    (DROPPED_X, or the dx GEMM's EPILOGUE_DROPOUT): a second fp32 [BLOCK_M, BLOCK_N] accumulator, so prefill tiles
    halve BLOCK_M to keep both in registers (2 x 64 x 128 fp32 over 8 warps: 64 registers a thread); DROPPED_X's
    stages also hold an xd tile (the dropout epilogue's do not: it only costs the pipeline a little depth).
    """
    # Unfused 16-row decode (the dx GEMM, R > 128): 4 warps spill with the dropout epilogue (8-16 STL on sm_90,
    # Triton 3.9) or the rank loop at rank tile 64 (2 STL on sm_80, 3.6); 8 warps with 4 stages spill 12-20 STL on
    # sm_80 (3.6); 8 warps, 2 stages: 58-64 registers, none on either (aot_check).
    unfused_16_rows = M <= 16 and fused_rank_block == 0 and dtype != torch.float32
    if M <= FUSED_SHRINK_MAX_M:  # decode: memory bound on W; narrow N tiles give >= 1 program per SM
        block_m = max(16, next_power_of_2(M))
        # More than 16 rows: 8 warps hold the [BLOCK_M, BLOCK_R] shrink accumulator (or the second accumulator)
        # beside the output's without spilling, and at BLOCK_M = 64 Hopper's wgmma applies (64-row warpgroups).
        warps = 8 if block_m > 16 or unfused_16_rows else 4
        tiles = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=warps)
        if (
            dtype == torch.float32
            or fused_rank_block == 0
            or fused_rank_block > 64
            or fused_rank_block * block_m >= 64 * 64
            or (block_m >= 32 and fused_rank_block >= 32)
        ):
            # 128-wide K tiles only for the fused shrink at small rank tiles. Past these sizes the A tile
            # [BLOCK_R, BLOCK_K] beside W's and the shrink accumulator [BLOCK_M, BLOCK_R] beside the output's spill
            # (32-64 rows at rank tile 32-64 with the shrink's dropout: 255 registers, 1-15 STL on sm_80 / sm_90);
            # unfused, the rank loop's t and U tiles or the dropout epilogue's second accumulator beside 4 stages of
            # 128-wide tiles spill 1-7 STL on sm_80 (aot_check full sweep, Triton 3.6 and 3.9; 64 wide: ~125
            # registers, none).
            tiles["BLOCK_K"] = 64
    elif dtype == torch.float32:
        tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4)
    else:
        tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8)
    if two_accumulators and M > FUSED_SHRINK_MAX_M and dtype != torch.float32:
        tiles["BLOCK_M"] = 64
    rows_per_stage = tiles["BLOCK_M"] * (2 if two_accumulators else 1) + tiles["BLOCK_N"] + fused_rank_block
    tiles["num_stages"] = pipeline_stages(
        rows_per_stage, tiles["BLOCK_K"], dtype.itemsize, most=2 if unfused_16_rows else 4
    )
    return tiles


def _launch_matmul(x, w, bias, t, u, v, a, y, *, scale, rank, fuse_shrink, p_drop, seed, epilogue_dropout=False,
                   col_scale=None, xd=None, z=None) -> None:  # fmt: skip
    """lora_matmul_kernel: y = x w^T + bias + scale * (t * v) u^T with its options; w, u, a may be any strided views.

    ``a`` (FUSE_SHRINK): A, the shrink rides the K loop and writes t; ``col_scale``: (num [N], den [N]);
    ``xd`` [M, K]: DROPPED_X; ``z`` [M, N]: STORE_Z.
    """
    M, K = x.shape
    N = w.shape[0]
    block_r = max(16, next_power_of_2(a.shape[0])) if fuse_shrink else rank_block(rank)
    # The dx GEMM's dropout epilogue keeps a second [BLOCK_M, BLOCK_N] fp32 tile (the low-rank term) beside b_acc.
    two_accumulators = xd is not None or epilogue_dropout
    tiles = _matmul_tiles(M, x.dtype, block_r if fuse_shrink else 0, two_accumulators=two_accumulators)
    grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(N, tiles["BLOCK_N"]),)
    a = a if a is not None else u  # unused when not fusing; any tensor satisfies the signature
    num, den = col_scale if col_scale is not None else (y, y)
    xd_in = xd if xd is not None else x
    z_out = z if z is not None else y
    traceable(lora_matmul_kernel)[grid](
        x, w, bias if bias is not None else y, t, u, v if v is not None else t, a, y, num, den, xd_in, z_out, seed,
        M, N, K, rank, float(scale), float(p_drop),
        *x.stride(), *w.stride(), *t.stride(), *u.stride(),
        *a.stride(), *y.stride(), *xd_in.stride(),
        *z_out.stride(),
        HAS_BIAS=bias is not None, HAS_RANK_SCALE=v is not None, FUSE_SHRINK=fuse_shrink,
        SHRINK_DROPOUT=fuse_shrink and p_drop > 0.0, EPILOGUE_DROPOUT=epilogue_dropout,
        HAS_COL_SCALE=col_scale is not None, DROPPED_X=xd is not None, STORE_Z=z is not None,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=block_r, **tiles,
    )  # fmt: skip


def shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] float32 = drop(x) a[:rank]^T, zero past rank. a: [R, K] (any strides)."""
    M, K = x.shape
    R = a.shape[0]
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)
    block_m, block_r = (16 if M <= 16 else 64), rank_block(R)
    # 16 x 64 tiles on 4 warps spill 2-4 STL at 56-128 registers on sm_90 (Triton 3.9, aot_check full sweep); on 8
    # warps: 40-98 registers, none on 3.6 or 3.9, and the same 128-wide K tiles
    warps = 8 if block_m == 16 and block_r == 64 else 4
    grid = (cdiv(M, block_m), cdiv(R, block_r))
    traceable(lora_shrink_kernel)[grid](
        x, a, t, seed, M, K, R, rank, float(p_drop),
        *x.stride(), *a.stride(), *t.stride(),
        HAS_DROPOUT=p_drop > 0.0, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=64 if x.dtype == torch.float32 else 128, BLOCK_R=block_r, num_warps=warps,
    )  # fmt: skip
    return t


def _scaled(t: Tensor, v: Tensor | None, scale: float, rank: int, dtype: torch.dtype) -> Tensor:
    """scale * (t * v)[:, :rank] in ``dtype``: the left factor of the cuBLAS strategy's in-place addmm."""
    t = t[:, :rank] * scale
    return (t if v is None else t * v[:rank]).to(dtype)


def lowrank_matmul(x, w, bias, t, u, v, *, scale, rank, p_drop=0.0, seed=0, epilogue_dropout=False, col_scale=None,
                   dropped_x=None, save_z=False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(y [M, N], z | None): see ``naive.lowrank_matmul``. Above ``CUBLAS_GEMM_MIN_M`` rows (``use_cublas_gemm``) the
    base product is cuBLAS and the low-rank term an in-place rank-b addmm (with ``col_scale``:
    ``lowrank_epilogue_kernel``); a dropout mask on the epilogue or ``dropped_x`` always take our GEMM."""
    M = x.shape[0]
    N = w.shape[0]
    if use_cublas_gemm(M) and not epilogue_dropout and dropped_x is None:
        if col_scale is None:
            y = torch.nn.functional.linear(x, w, bias)
            y.addmm_(_scaled(t, v, scale, rank, x.dtype), u[:, :rank].t())
            return y, (y - bias if bias is not None else y.clone()) if save_z else None
        y = torch.nn.functional.linear(x, w)
        z = torch.empty_like(y) if save_z else None
        grid = (cdiv(M, 64), cdiv(N, 128))
        tv = t if v is None else t * v.float()  # DoRA has no rank scale; kept for the interface
        traceable(lowrank_epilogue_kernel)[grid](
            y, tv, u, col_scale[0], col_scale[1], bias if bias is not None else y, z if z is not None else y,
            M, N, rank, float(scale), *y.stride(), *tv.stride(), *u.stride(),
            (z if z is not None else y).stride(0), (z if z is not None else y).stride(1),
            HAS_BIAS=bias is not None, STORE_Z=save_z, DOT_PRECISION=dot_precision(y.dtype),
            BLOCK_M=64, BLOCK_N=128, BLOCK_R=rank_block(rank), num_warps=4,
        )  # fmt: skip
        return y, z
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = torch.empty(M, N, device=x.device, dtype=x.dtype) if save_z else None
    _launch_matmul(x, w, bias, t, u, v, None, y, scale=scale, rank=rank, fuse_shrink=False, p_drop=p_drop, seed=seed,
                   epilogue_dropout=epilogue_dropout, col_scale=col_scale, xd=dropped_x, z=z)  # fmt: skip
    return y, z


def fused_forward(x, weight, bias, lora_A, lora_B, v, *, scale, rank, p_drop, seed, col_scale=None, save_z=False):
    """The one-launch forward at decode sizes (M <= 64, R <= 128): the shrink rides the GEMM's K loop, column block 0
    writes xa. Returns (y, xa, z | None), or None where it does not apply (the op then runs the primitives)."""
    M = x.shape[0]
    N, R = lora_B.shape
    if M > FUSED_SHRINK_MAX_M or R > FUSED_SHRINK_MAX_RANK:
        return None
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    z = torch.empty(M, N, device=x.device, dtype=x.dtype) if save_z else None
    # Column block 0 writes xa[:, :rank]; ranks past an active rank below R stay zero.
    xa = (torch.empty if rank == R else torch.zeros)(M, R, device=x.device, dtype=torch.float32)
    _launch_matmul(x, weight, bias, xa, lora_B, v, lora_A, y, scale=scale, rank=rank, fuse_shrink=True,
                   p_drop=p_drop, seed=seed, col_scale=col_scale, z=z)  # fmt: skip
    return y, xa, z


def weight_grad(t, x, v, *, scale, rank_start, rank, p_drop=0.0, seed=0) -> Tensor:
    """[rank - rank_start, K] float32 = scale * v * t[:, rank_start:rank]^T drop(x), a deterministic split-M sum."""
    M, K = x.shape
    n_ranks = rank - rank_start
    # With dropout the [BLOCK_M, BLOCK_K] hash beside the [BLOCK_R, BLOCK_K] accumulator spills at BLOCK_K = 128.
    block_k, block_r, block_m = 64 if p_drop > 0.0 else 128, rank_block(n_ranks), 64
    splits, rows_per_split = row_splits(M, cdiv(K, block_k) * cdiv(n_ranks, block_r), block_m,
                                        min_rows=WEIGHT_GRAD_MIN_ROWS)  # fmt: skip
    out = torch.empty(splits, n_ranks, K, device=x.device, dtype=torch.float32)
    traceable(lora_weight_grad_kernel)[(cdiv(K, block_k), cdiv(n_ranks, block_r), splits)](
        t, x, v if v is not None else t, out, seed, M, K, rank_start, rank, rows_per_split, float(scale),
        float(p_drop), *t.stride(), *x.stride(), *out.stride(),
        HAS_RANK_SCALE=v is not None, HAS_DROPOUT=p_drop > 0.0,
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        # 4 warps spill at 128 registers (Triton 3.9): 1 STL on sm_90 with dropout at rank tiles <= 32, 3 STL on sm_80
        # without it at rank tile 64. 8 warps spill in the other two cases: with dropout at rank tile 64 (3 STL on
        # sm_80), and without it with the rank scale at rank tile 32 (1 STL on sm_90). aot_check, Triton 3.6 and 3.9
        num_warps=8 if (p_drop > 0.0) != (block_r == 64) else 4,
    )  # fmt: skip
    return out.sum(0) if splits > 1 else out[0]


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device) -> Tensor:
    """The mask (0 or 1/(1-p), float32 [M, K]) that these kernels apply for ``seed`` (for tests)."""
    M, K = shape
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    traceable(dropout_mask_kernel)[(cdiv(M, 32), cdiv(K, 32))](
        out, seed, M, K, float(p), *out.stride(), BLOCK_M=32, BLOCK_K=32
    )
    return out
