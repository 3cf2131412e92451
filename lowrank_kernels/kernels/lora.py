"""Triton kernels for LoRA / DyLoRA (``y = x W0^T + bias + s ((drop(x) A[:b]^T) * v) B[:, :b]^T``) and launchers.

Math and notation: ``lowrank_kernels/reference/lora.py``. Three kernels cover forward and backward:

- ``lora_shrink_kernel``:  ``t = drop(x) A[:b]^T``              (forward ``xa``; backward ``dyb = dy B[:, :b]``)
- ``lora_matmul_kernel``:  ``y = x W^T + bias + s (t * v) U^T``  (forward ``y``; backward ``dx``), the low-rank
  term added in the GEMM epilogue. At decode sizes it also computes ``t`` itself, so the forward is one launch.
  Optionally (DoRA, ``kernels/dora.py``) a per-column output scale and a second accumulator for ``drop(x) W^T``.
- ``lora_weight_grad_kernel``: ``out = s v * t^T drop(x)``     (``dA`` and ``dB^T``), split over M.

The active rank ``b`` is a runtime argument everywhere: masked loads and runtime loop bounds, never a
``tl.constexpr``, so changing it never recompiles and the bytes read track ``b``. Dropout masks are a pure
function of ``(seed, row, column)`` (a counter hash), so the backward regenerates the forward's mask, never saves it.
Launchers check nothing the ops layer already checked; they allocate, pick tiles and launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Forward at M <= 64 runs as one launch that also computes xa; it keeps xa for all ranks in registers.
FUSED_SHRINK_MAX_M = 64
FUSED_SHRINK_MAX_RANK = 128
# Above this M the base GEMM goes to cuBLAS and the low-rank term is added by an in-place rank-b addmm: BENCH.md
# measured a plain Triton GEMM at 1.12-1.27x cuBLAS for M >= 2048 on an H100 (0.95-1.06x for M <= 64), so until our
# own GEMM is measured at least as fast, cuBLAS + epilogue is the safer prediction. LOWRANK_KERNELS_LORA_GEMM=triton
# or =cublas forces one strategy (the benchmarks time both). Unmeasured: see docs/GPU_NOTES.md.
CUBLAS_GEMM_MIN_M = 65
GEMM_ENV_VAR = "LOWRANK_KERNELS_LORA_GEMM"


def use_cublas_gemm(M: int) -> bool:
    """Whether the base GEMM of an M-row call goes to cuBLAS (then low-rank epilogue) or to our fused kernel."""
    choice = os.environ.get(GEMM_ENV_VAR, "auto").strip().lower()
    if choice not in ("auto", "triton", "cublas"):
        raise ValueError(f"{GEMM_ENV_VAR} must be auto, triton or cublas, got {choice!r}")
    return choice == "cublas" or (choice == "auto" and M >= CUBLAS_GEMM_MIN_M)


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser: a bijection with full avalanche (reference.dropout_keep computes the same)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _dropout_keep(seed, p_drop, o_m, o_k, n_cols):
    """[len(o_m), len(o_k)] booleans: does dropout keep x at (row o_m, column o_k) of an n_cols-wide x?

    Kernels zero the dropped inputs (exact in any dtype) and apply 1/(1-p) to the fp32 accumulator, so a
    float16 x is never rounded twice.

    A hash of (seed, m * n_cols + k), bit-identical to ``reference.dropout_mask``, so every backend, the forward
    and the backward draw the same mask whatever the Triton version.
    """
    o_flat = o_m[:, None] * n_cols + o_k[None, :]
    b_lo = o_flat.to(tl.uint32)
    b_hi = (o_flat >> 32).to(tl.uint32)
    b_key = _fmix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    b_hash = _fmix32(_fmix32(b_lo ^ b_key) ^ b_hi)
    b_uniform = (b_hash >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 random bits: exact in float32
    return b_uniform >= p_drop


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def dropout_mask_kernel(
    out_ptr,
    seed,
    M,
    K,
    p_drop,
    stride_om,
    stride_ok,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Materialise the dropout mask the other kernels apply (tests and debugging only)."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    b_mask = tl.where(_dropout_keep(seed, p_drop, o_m, o_k, K), 1.0 / (1.0 - p_drop), 0.0)
    p_out = out_ptr + o_m[:, None] * stride_om + o_k[None, :] * stride_ok
    tl.store(p_out, b_mask, mask=(o_m[:, None] < M) & (o_k[None, :] < K))


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def lora_shrink_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    seed,
    M,
    K,
    R,
    rank,
    p_drop,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_tm,
    stride_tr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
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
            b_x = tl.where(_dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
        p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_a), b_acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        b_acc *= 1.0 / (1.0 - p_drop)
    p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
    tl.store(p_t, b_acc, mask=m_m[:, None] & (o_r[None, :] < R))


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def lora_matmul_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    t_ptr,
    u_ptr,
    v_ptr,
    a_ptr,
    y_ptr,
    cs_num_ptr,
    cs_den_ptr,
    xd_ptr,
    z_ptr,
    seed,
    M,
    N,
    K,
    rank,
    scale,
    p_drop,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_tm,
    stride_tr,
    stride_un,
    stride_ur,
    stride_ar,
    stride_ak,
    stride_ym,
    stride_yn,
    stride_xdm,
    stride_xdk,
    stride_zm,
    stride_zn,
    HAS_BIAS: tl.constexpr,
    HAS_RANK_SCALE: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,
    SHRINK_DROPOUT: tl.constexpr,
    EPILOGUE_DROPOUT: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    DROPPED_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
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
    ``x W0^T + (g - 1) drop(x) W0^T + g s ...``); ``z = drop(x) W^T + low-rank`` (before g) is stored to z_ptr.
    xd is an input, not a mask drawn here: every column block would redraw the same [BLOCK_M, K] mask, N / BLOCK_N
    hashes per element (estimate: at M = 2048 on 4096x4096, 270M hashes of ~25 integer ops, several GEMMs' time).
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), grouped by GROUP_M row blocks so W tiles stay in L2.
    """
    tl.static_assert(not (DROPPED_X and FUSE_SHRINK), "DROPPED_X reads xd; the fused shrink draws its own mask")
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

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
                b_x = tl.where(_dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
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
            b_acc += tl.where(_dropout_keep(seed, p_drop, o_m, o_n, N), b_low * (1.0 / (1.0 - p_drop)), 0.0)
        else:
            b_acc = b_low

    if DROPPED_X:
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
    t_ptr,
    x_ptr,
    v_ptr,
    out_ptr,
    seed,
    M,
    K,
    rank_start,
    rank,
    rows_per_split,
    scale,
    p_drop,
    stride_tm,
    stride_tr,
    stride_xm,
    stride_xk,
    stride_os,
    stride_or,
    stride_ok,
    HAS_RANK_SCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
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
            b_x = tl.where(_dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
        b_acc = tl.dot(tl.trans(b_t.to(b_x.dtype)), b_x, b_acc, input_precision=DOT_PRECISION)
    b_scale = tl.zeros((BLOCK_R,), tl.float32) + scale / (1.0 - p_drop)  # p_drop = 0 without dropout
    if HAS_RANK_SCALE:
        b_scale *= tl.load(v_ptr + o_r, mask=m_r, other=0.0).to(tl.float32)
    b_acc *= b_scale[:, None]
    p_out = out_ptr + pid_s * stride_os + (o_r - rank_start)[:, None] * stride_or + o_k[None, :] * stride_ok
    tl.store(p_out, b_acc, mask=m_r[:, None] & m_k[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers: allocation, tile choice, grid. No autograd, no input validation (the ops layer does it).
# ----------------------------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get true fp32 products, as torch's F.linear gives by default (tf32 would be 3e-4 off).
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_block(rank: int) -> int:
    """Rank tile: tl.dot needs >= 16; 64 keeps the [BLOCK_M, BLOCK_R] fp32 accumulator in registers."""
    return min(64, max(16, triton.next_power_of_2(rank)))


# Hopper allows 227 KB of shared memory per block; leave room for the epilogue's layout conversions.
SHARED_MEMORY_BUDGET = 160 * 1024


def _matmul_tiles(M: int, dtype: torch.dtype, fused_rank_block: int, two_accumulators: bool = False) -> dict:
    """Tiles of lora_matmul_kernel. Untuned first picks (no GPU measured yet, see docs/GPU_NOTES.md).

    ``fused_rank_block``: rows of A streamed beside W when the shrink is fused (0 otherwise). The pipeline depth
    is the most stages (<= 4) whose x, W (and A) tiles fit the shared-memory budget. ``two_accumulators``
    (DROPPED_X): a second fp32 [BLOCK_M, BLOCK_N] accumulator, so prefill tiles halve BLOCK_M to keep both in
    registers (2 x 64 x 128 fp32 over 8 warps: 64 registers a thread), and each stage also holds an xd tile.
    """
    if M <= FUSED_SHRINK_MAX_M:  # decode: memory bound on W; narrow N tiles give >= 1 program per SM
        tiles = dict(BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4)
    elif dtype == torch.float32:
        tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4)
    else:
        tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8)
    if dtype == torch.float32 and M <= FUSED_SHRINK_MAX_M:
        tiles["BLOCK_K"] = 64
    if two_accumulators and M > FUSED_SHRINK_MAX_M and dtype != torch.float32:
        tiles["BLOCK_M"] = 64
    rows_per_stage = tiles["BLOCK_M"] * (2 if two_accumulators else 1) + tiles["BLOCK_N"] + fused_rank_block
    stage_bytes = rows_per_stage * tiles["BLOCK_K"] * dtype.itemsize
    tiles["num_stages"] = max(1, min(4, SHARED_MEMORY_BUDGET // stage_bytes))
    return tiles


def _launch_matmul(
    x, w, bias, t, u, v, a, y, *, scale, rank, fuse_shrink, shrink_dropout, epilogue_dropout, p_drop, seed,
    col_scale=None, xd=None, z=None,
):  # fmt: skip
    """y = x w^T + bias + scale * (t * v) u^T (see lora_matmul_kernel); w, u, a may be any strided views.

    ``col_scale``: (num [N], den [N]), HAS_COL_SCALE; ``xd`` [M, K] and ``z`` [M, N] (together): DROPPED_X.
    """
    M, K = x.shape
    N = w.shape[0]
    block_r = max(16, triton.next_power_of_2(a.shape[0])) if fuse_shrink else _rank_block(rank)
    tiles = _matmul_tiles(M, x.dtype, block_r if fuse_shrink else 0, two_accumulators=z is not None)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
    a = a if a is not None else u  # unused when not fusing; any tensor satisfies the signature
    num, den = col_scale if col_scale is not None else (y, y)
    xd_in, z_out = (xd, z) if z is not None else (x, y)  # unused without DROPPED_X
    lora_matmul_kernel[grid](
        x, w, bias if bias is not None else y, t, u, v if v is not None else t, a, y, num, den, xd_in, z_out, seed,
        M, N, K, rank, float(scale), float(p_drop),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), u.stride(0), u.stride(1),
        a.stride(0), a.stride(1), y.stride(0), y.stride(1), xd_in.stride(0), xd_in.stride(1),
        z_out.stride(0), z_out.stride(1),
        HAS_BIAS=bias is not None, HAS_RANK_SCALE=v is not None, FUSE_SHRINK=fuse_shrink,
        SHRINK_DROPOUT=shrink_dropout, EPILOGUE_DROPOUT=epilogue_dropout, HAS_COL_SCALE=col_scale is not None,
        DROPPED_X=z is not None, DOT_PRECISION=_dot_precision(x.dtype), BLOCK_R=block_r, **tiles,
    )  # fmt: skip


def _launch_shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] float32 = drop(x) a[:rank]^T, zero past rank. a: [R, K] (any strides)."""
    M, K = x.shape
    R = a.shape[0]
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)
    block_m, block_r = (16 if M <= 16 else 64), _rank_block(R)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
    lora_shrink_kernel[grid](
        x, a, t, seed, M, K, R, rank, float(p_drop),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        HAS_DROPOUT=p_drop > 0.0, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=64 if x.dtype == torch.float32 else 128, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return t


def _launch_weight_grad(
    t: Tensor,
    x: Tensor,
    v: Tensor | None,
    *,
    scale: float,
    rank_start: int,
    rank: int,
    p_drop: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """[rank - rank_start, K] float32 = scale * v * t[:, rank_start:rank]^T drop(x), deterministic split-M sum."""
    M, K = x.shape
    n_ranks = rank - rank_start
    block_k, block_r, block_m = 128, _rank_block(n_ranks), 64
    tiles = triton.cdiv(K, block_k) * triton.cdiv(n_ranks, block_r)
    # Enough row splits for ~2 programs per SM on a 132-SM H100, but at least 256 rows per split.
    splits = max(1, min(triton.cdiv(264, tiles), triton.cdiv(M, 256)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    out = torch.empty(splits, n_ranks, K, device=x.device, dtype=torch.float32)
    lora_weight_grad_kernel[(triton.cdiv(K, block_k), triton.cdiv(n_ranks, block_r), splits)](
        t, x, v if v is not None else t, out, seed, M, K, rank_start, rank, rows_per_split, float(scale),
        float(p_drop), t.stride(0), t.stride(1), x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        out.stride(2), HAS_RANK_SCALE=v is not None, HAS_DROPOUT=p_drop > 0.0,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return out.sum(0) if splits > 1 else out[0]


def lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, dropout_p, seed,
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """x: [M, K] -> (y [M, N] in x's dtype, xa [M, R] float32 = drop(x) A[:rank]^T, zero past rank).

    One launch when M <= 64 (the shrink rides the GEMM's K loop), else a shrink and then either our GEMM with the
    low-rank epilogue or cuBLAS plus an in-place rank-b addmm (``use_cublas_gemm``).
    """
    M = x.shape[0]
    N, R = lora_B.shape
    fuse = M <= FUSED_SHRINK_MAX_M and R <= FUSED_SHRINK_MAX_RANK
    if not fuse and use_cublas_gemm(M):
        xa = _launch_shrink(x, lora_A, rank, p_drop=dropout_p, seed=seed)
        y = torch.nn.functional.linear(x, weight, bias)
        y.addmm_(_scaled(xa, rank_scale, scale, rank, x.dtype), lora_B[:, :rank].t())
        return y, xa
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if fuse:
        # Column block 0 writes xa[:, :rank]; the zeros past rank come from here.
        xa = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    else:
        xa = _launch_shrink(x, lora_A, rank, p_drop=dropout_p, seed=seed)
    _launch_matmul(x, weight, bias, xa, lora_B, rank_scale, lora_A if fuse else None, y, scale=scale, rank=rank,
                   fuse_shrink=fuse, shrink_dropout=dropout_p > 0.0, epilogue_dropout=False, p_drop=dropout_p,
                   seed=seed)  # fmt: skip
    return y, xa


def _scaled(t: Tensor, rank_scale: Tensor | None, scale: float, rank: int, dtype: torch.dtype) -> Tensor:
    """scale * (t * v)[:, :rank] in ``dtype``: the left factor of the cuBLAS low-rank epilogue."""
    t = t[:, :rank] * scale
    return (t if rank_scale is None else t * rank_scale[:rank]).to(dtype)


def lora_backward(grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start, dropout_p, seed,
                  needs_dx=True, needs_dAB=True):  # fmt: skip
    """Returns (dx [M, K], dA [R, K], dB [N, R], dv [R] | None); dx / dA, dB empty [0] when not needed."""
    M = x.shape[0]
    dy = grad_out
    dyb = _launch_shrink(dy, lora_B.t(), rank)  # [M, R] float32, dy B[:, :rank]
    dx = x.new_empty(0)
    if needs_dx:
        if use_cublas_gemm(M) and dropout_p == 0.0:  # with dropout the mask rides our GEMM's epilogue
            dx = torch.mm(dy, weight).addmm_(_scaled(dyb, rank_scale, scale, rank, x.dtype), lora_A[:rank])
        else:
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
            # dx = dy W0 + s drop'((dyb * v) A): the GEMM over N with A^T as the low-rank "up" matrix.
            _launch_matmul(dy, weight.t(), None, dyb, lora_A.t(), rank_scale, None, dx, scale=scale, rank=rank,
                           fuse_shrink=False, shrink_dropout=False, epilogue_dropout=dropout_p > 0.0,
                           p_drop=dropout_p, seed=seed)  # fmt: skip
    dA, dB = x.new_empty(0), x.new_empty(0)  # distinct tensors: custom-op outputs may not alias
    if needs_dAB:
        dA = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
        dB = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
        grad_args = dict(scale=scale, rank_start=grad_rank_start, rank=rank)
        dA[grad_rank_start:rank] = _launch_weight_grad(dyb, x, rank_scale, p_drop=dropout_p, seed=seed, **grad_args)
        dB[:, grad_rank_start:rank] = _launch_weight_grad(xa, dy, rank_scale, **grad_args).t()
    dv = None
    if rank_scale is not None:
        dv = torch.zeros_like(rank_scale)
        sl = slice(grad_rank_start, rank)
        dv[sl] = (scale * (xa[:, sl] * dyb[:, sl]).sum(0)).to(rank_scale.dtype)
    return dx, dA, dB, dv


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device) -> Tensor:
    """The mask (0 or 1/(1-p), float32 [M, K]) that these kernels apply for ``seed`` (for tests)."""
    M, K = shape
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    dropout_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](
        out, seed, M, K, float(p), out.stride(0), out.stride(1), BLOCK_M=32, BLOCK_K=32
    )
    return out
