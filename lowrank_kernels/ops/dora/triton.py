"""DoRA on Triton: its primitives ``row_norm``, ``dropout_shrink``, ``dora_dx``, ``col_dot`` (interface and math:
``naive.py``) beside LoRA's (``ops/lora/triton.py``: shrink, the GEMM with the low-rank epilogue, which takes DoRA's
column scale ``g = m / norm`` and stores ``z``, weight gradients, the one-launch decode override). Four kernels:

- ``dora_norm_kernel``: the detached row norm by the factored formula, one pass over W0 (``U = W0 A^T`` accumulated
  tile by tile, never an [N, K] temporary), ``||W0_n||^2`` from the caller's cache or from the same tiles; blocks
  whose sum cancelled recompute those rows directly.
- ``dora_dropout_shrink_kernel``: with dropout, ``xd = x * keep`` (the mask drawn once per element) and
  ``xa = drop(x) A^T`` in one pass over x, for the GEMM's second accumulator.
- ``dora_dx_kernel``: ``dx = (dy * g) W0 + s t A`` (dropout: ``dy W0 + drop'((dy * (g - 1)) W0 + s t A)``), the
  scale g applied to dy's tiles along the reduction, so no [M, N] ``dy * g`` is ever formed.
- ``col_dot_kernel``: ``sum_rows(dy * z)`` (the magnitude gradient), split over rows.

The rank ``b`` is a runtime argument throughout (masked loads, runtime loop bounds), as in the LoRA kernels.
"""

from __future__ import annotations

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
from ..lora.triton import _matmul_tiles, fused_forward, lowrank_matmul, shrink, weight_grad
from .naive import CANCELLATION_FRACTION

__all__ = ["fused_forward", "lowrank_matmul", "shrink", "weight_grad"]  # LoRA's primitives, beside DoRA's own


@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, gram_ptr, w0sq_ptr, norm_ptr,
    N, K, rank, scale, cancel_fraction,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_gi, stride_gj,
    HAS_W0SQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_K_DIRECT: tl.constexpr,
):  # fmt: skip
    """norm[n] = sqrt(||W_n||^2 + 2 s <B_n, U_n> + s^2 B_n G B_n^T), U = W A[:rank]^T, fp32.

    W: [N, K], A: [R, K], B: [N, R], G: [rank, rank] float32 = A[:rank] A[:rank]^T, w0sq: [N] float32 (HAS_W0SQ;
    otherwise summed from the W tiles this pass reads anyway), norm: [N] float32.
    U is accumulated over K a BLOCK_R-rank chunk at a time (one chunk, so one pass over W, up to R = 128) and only
    its dot with B's chunk is kept; the quadratic term needs B and G alone. A row whose factored sum is below
    ``cancel_fraction * (||W_n||^2 + s^2 B_n G B_n^T)`` lost its digits to cancellation: a block holding one recomputes
    its rows directly, ``||W_n + s B_n A||^2`` from [BLOCK_N, BLOCK_K_DIRECT] tiles in IEEE fp32 (rare: the adapted
    row must nearly cancel W0). Grid: (cdiv(N, BLOCK_N),).
    """
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_w0sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        o_r = r_start + tl.arange(0, BLOCK_R)
        m_r = o_r < rank
        b_u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            o_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
            m_k = o_k < K
            p_w = w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk
            b_w = tl.load(p_w, mask=m_n[:, None] & m_k[None, :], other=0.0)
            p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
            b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)
            b_u = tl.dot(b_w, tl.trans(b_a), b_u, input_precision=DOT_PRECISION)
            if not HAS_W0SQ:
                if r_start == 0:
                    b_wf = b_w.to(tl.float32)
                    b_w0sq += tl.sum(b_wf * b_wf, axis=1)
        p_b = b_ptr + o_n[:, None] * stride_bn + o_r[None, :] * stride_br
        b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0).to(tl.float32)
        b_cross += tl.sum(b_b * b_u, axis=1)

    # B_n G B_n^T over BLOCK_G x BLOCK_G blocks of G, in true fp32 (tf32 would cost ~1e-3 of the term).
    b_quad = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c1 in range(0, rank, BLOCK_G):
        o_c1 = c1 + tl.arange(0, BLOCK_G)
        m_c1 = o_c1 < rank
        b_bg = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
        for c2 in range(0, rank, BLOCK_G):
            o_c2 = c2 + tl.arange(0, BLOCK_G)
            m_c2 = o_c2 < rank
            p_b2 = b_ptr + o_n[:, None] * stride_bn + o_c2[None, :] * stride_br
            b_b2 = tl.load(p_b2, mask=m_n[:, None] & m_c2[None, :], other=0.0).to(tl.float32)
            p_g = gram_ptr + o_c2[:, None] * stride_gi + o_c1[None, :] * stride_gj
            b_g = tl.load(p_g, mask=m_c2[:, None] & m_c1[None, :], other=0.0)
            b_bg = tl.dot(b_b2, b_g, b_bg, input_precision="ieee")
        p_b1 = b_ptr + o_n[:, None] * stride_bn + o_c1[None, :] * stride_br
        b_b1 = tl.load(p_b1, mask=m_n[:, None] & m_c1[None, :], other=0.0).to(tl.float32)
        b_quad += tl.sum(b_bg * b_b1, axis=1)

    if HAS_W0SQ:
        b_w0sq = tl.load(w0sq_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_nsq = b_w0sq + 2.0 * scale * b_cross + scale * scale * b_quad
    b_cancelled = (b_nsq < cancel_fraction * (b_w0sq + scale * scale * b_quad)) & m_n
    if tl.max(b_cancelled.to(tl.int32), axis=0) > 0:
        b_direct = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K_DIRECT):
            o_k = k_start + tl.arange(0, BLOCK_K_DIRECT).to(tl.int64)
            m_k = o_k < K
            p_w = w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk
            b_row = tl.load(p_w, mask=m_n[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            for r_start in range(0, rank, BLOCK_R):
                o_r = r_start + tl.arange(0, BLOCK_R)
                m_r = o_r < rank
                p_b = b_ptr + o_n[:, None] * stride_bn + o_r[None, :] * stride_br
                b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0).to(tl.float32)
                p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
                b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0).to(tl.float32)
                b_row = tl.dot(b_b * scale, b_a, b_row, input_precision="ieee")
            b_direct += tl.sum(b_row * b_row, axis=1)
        b_nsq = tl.where(b_cancelled, b_direct, b_nsq)
    # IEEE sqrt (not the fast one): with B = 0 the norm equals sqrt(||W0_n||^2) bit for bit, so a fresh layer's
    # g = m / norm is exactly 1.
    tl.store(norm_ptr + o_n, tl.sqrt_rn(tl.maximum(b_nsq, 0.0)), mask=m_n)


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def dora_dropout_shrink_kernel(
    x_ptr, a_ptr, xd_ptr, t_ptr,
    seed, M, K, R, rank, p_drop,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xdm, stride_xdk, stride_tm, stride_tr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """xd = x * keep (dropped entries zeroed, not rescaled: exact in any dtype), written by rank block 0, and
    t[m, r] = sum_k drop(x)[m, k] A[r, k] for r < rank, 0 for rank <= r < R (float32, 1/(1-p) applied).

    The mask is ``_dropout_keep``'s (the one every backend draws). x, xd: [M, K], A: [R, K], t: [M, R].
    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    r_start = pid_r * BLOCK_R
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = r_start + tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < rank
    b_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # Rank blocks wholly past the active rank skip the K loop (block 0 never does: it writes xd).
    k_end = tl.where((r_start < rank) | (pid_r == 0), K, 0)
    for k_start in range(0, k_end, BLOCK_K):
        o_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        m_mk = m_m[:, None] & (o_k < K)[None, :]
        b_x = tl.load(x_ptr + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk, mask=m_mk, other=0.0)
        b_x = tl.where(dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
        if pid_r == 0:
            tl.store(xd_ptr + o_m[:, None] * stride_xdm + o_k[None, :] * stride_xdk, b_x, mask=m_mk)
        p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_r[:, None] & (o_k < K)[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_a), b_acc, input_precision=DOT_PRECISION)
    b_acc *= 1.0 / (1.0 - p_drop)
    p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
    tl.store(p_t, b_acc, mask=m_m[:, None] & (o_r[None, :] < R))


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def dora_dx_kernel(
    dy_ptr, w_ptr, g_ptr, t_ptr, a_ptr, dx_ptr,
    seed, M, N, K, rank, scale, p_drop,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_tm, stride_tr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """DoRA's input gradient, fp32 accumulation:

        dx = (dy * g) W + scale * t[:, :rank] A[:rank]                              without dropout
        dx = dy W + drop'((dy * (g - 1)) W + scale * t[:, :rank] A[:rank])          HAS_DROPOUT

    dy: [M, N], W: [N, K], g: [N] float32, t = (dy * g) B: [M, >=rank] float32, A: [R, K], dx: [M, K]; ``drop'``
    multiplies by the forward's dropout mask at x's (m, k), 1/(1-p) included. The reduction runs over N in BLOCK_N
    steps; g scales dy's tiles as they are loaded. Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),), grouped by GROUP_M.
    """
    pid_m, pid_k = grouped_program(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)

    o_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_k = o_k < K
    b_acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_DROPOUT:
        b_acc_scaled = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n_start in range(0, N, BLOCK_N):
        o_n = n_start + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        p_dy = dy_ptr + o_m[:, None] * stride_dym + o_n[None, :] * stride_dyn
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_n[None, :], other=0.0)
        p_w = w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk
        b_w = tl.load(p_w, mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_g = tl.load(g_ptr + o_n, mask=m_n, other=0.0)
        if HAS_DROPOUT:
            b_acc = tl.dot(b_dy, b_w, b_acc, input_precision=DOT_PRECISION)
            b_dy_scaled = (b_dy.to(tl.float32) * (b_g - 1.0)[None, :]).to(b_w.dtype)
            b_acc_scaled = tl.dot(b_dy_scaled, b_w, b_acc_scaled, input_precision=DOT_PRECISION)
        else:
            b_dy_scaled = (b_dy.to(tl.float32) * b_g[None, :]).to(b_w.dtype)
            b_acc = tl.dot(b_dy_scaled, b_w, b_acc, input_precision=DOT_PRECISION)

    if HAS_DROPOUT:
        b_low = b_acc_scaled
    else:
        b_low = b_acc
    for r_start in range(0, rank, BLOCK_R):
        o_r = r_start + tl.arange(0, BLOCK_R)
        m_r = o_r < rank
        p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
        b_t = tl.load(p_t, mask=m_m[:, None] & m_r[None, :], other=0.0)
        p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)
        b_low = tl.dot((b_t * scale).to(b_a.dtype), b_a, b_low, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        b_acc += tl.where(dropout_keep(seed, p_drop, o_m, o_k, K), b_low * (1.0 / (1.0 - p_drop)), 0.0)
    else:
        b_acc = b_low
    p_dx = dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk
    tl.store(p_dx, b_acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def col_dot_kernel(
    p_ptr, q_ptr, out_ptr,
    M, N, rows_per_split,
    stride_pm, stride_pn, stride_qm, stride_qn, stride_os, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out[s, n] = sum_{m in split s} p[m, n] * q[m, n] in fp32; p, q: [M, N], out: [splits, N] float32 (summed over
    s by the launcher: deterministic). DoRA's magnitude gradient ``sum_rows(dy * z)``. Grid: (cdiv(N, BLOCK_N), splits).
    """
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_s = tl.program_id(1).to(tl.int64)
    m_n = o_n < N
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    b_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m_start in range(m_begin, m_end, BLOCK_M):
        o_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mn = (o_m < m_end)[:, None] & m_n[None, :]
        b_p = tl.load(p_ptr + o_m[:, None] * stride_pm + o_n[None, :] * stride_pn, mask=m_mn, other=0.0)
        b_q = tl.load(q_ptr + o_m[:, None] * stride_qm + o_n[None, :] * stride_qn, mask=m_mn, other=0.0)
        b_acc += tl.sum(b_p.to(tl.float32) * b_q.to(tl.float32), axis=0)
    tl.store(out_ptr + pid_s * stride_os + o_n * stride_on, b_acc, mask=m_n)


# ---------------------------------------------------------------------------------------------------------------
# The primitives (interface and math: ``naive.py``): allocation, tile choice, grid. No validation: the op did it.
# ---------------------------------------------------------------------------------------------------------------


def row_norm(weight, lora_A, lora_B, weight_norm_sq, *, scale, rank) -> Tensor:
    """[N] float32 = ||W0 + scale B[:, :rank] A[:rank]||_row: one pass over W0, nothing [N, K] allocated; row blocks
    where the factored sum cancelled recompute their rows directly (in the same launch, no host sync).

    weight_norm_sq: [N] float32 ``||W0_n||^2`` (cached by the caller) | None (then summed in the same pass).
    """
    N, K = weight.shape
    R = lora_A.shape[0]
    a = lora_A[:rank].float()
    # G = A A^T [rank, rank] in fp32: cuBLAS, exact products for 16-bit adapters (tf32 only for fp32 adapters, and
    # only if the caller enabled tf32 matmuls globally).
    gram = a @ a.t()
    norm = torch.empty(N, device=weight.device, dtype=torch.float32)
    # 32-row tiles: >= 128 programs stream W0 at N = 4096 (132 SMs on an H100); all ranks up to 128 in one pass.
    # 8 warps, K tiles of 64 past rank 64 and 3 stages at rank tile 64: the choices without a spill in 16 bits on
    # sm_80 and sm_90 (ptxas, scripts/aot_check.py; 4 warps or 128-wide K tiles at rank 128 spill a few registers).
    block_r = min(128, max(16, next_power_of_2(R)))
    block_n, block_k = 32, 64 if weight.dtype == torch.float32 or block_r > 64 else 128
    stages = pipeline_stages(block_n + block_r, block_k, weight.dtype.itemsize, most=3 if block_r == 64 else 4)
    w0sq = weight_norm_sq if weight_norm_sq is not None else norm  # unread without HAS_W0SQ
    traceable(dora_norm_kernel)[(cdiv(N, block_n),)](
        weight, lora_A, lora_B, gram, w0sq, norm, N, K, rank, float(scale), float(CANCELLATION_FRACTION),
        *weight.stride(), *lora_A.stride(), *lora_B.stride(),
        *gram.stride(),
        HAS_W0SQ=weight_norm_sq is not None, DOT_PRECISION=dot_precision(weight.dtype),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_G=32, BLOCK_K_DIRECT=32,
        num_warps=8, num_stages=stages,
    )  # fmt: skip
    return norm


def dropout_shrink(x: Tensor, lora_A: Tensor, rank: int, *, p_drop: float, seed: int) -> tuple[Tensor, Tensor]:
    """(xd [M, K] = x * keep in x's dtype, xa [M, R] float32 = drop(x) A[:rank]^T, zero past rank)."""
    M, K = x.shape
    R = lora_A.shape[0]
    xd = torch.empty(M, K, device=x.device, dtype=x.dtype)
    xa = torch.empty(M, R, device=x.device, dtype=torch.float32)
    # A memory-bound pass over x: 16-row tiles keep >= 2 programs per SM (132 on an H100) up to M = 4224; the
    # hash over a [64, 128] tile would take 247 registers a thread (ptxas, sm_90), [16, 128] 88.
    block_m, block_r = (16 if cdiv(M, 16) <= 264 else 32), rank_block(R)
    traceable(dora_dropout_shrink_kernel)[(cdiv(M, block_m), cdiv(R, block_r))](
        x, lora_A, xd, xa, seed, M, K, R, rank, float(p_drop),
        *x.stride(), *lora_A.stride(), *xd.stride(),
        *xa.stride(), DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=64 if x.dtype == torch.float32 else 128, BLOCK_R=block_r,
        # 4 warps spill on sm_90 (Triton 3.9): 5 STL at 128 registers at 32 rows, 1-3 STL at 96 at 16 rows (M not a
        # multiple of 16, rank tile 16); 8 warps: 96-106 registers at 16 rows, none on 3.6 or 3.9 (aot_check)
        num_warps=8,
    )  # fmt: skip
    return xd, xa


def dora_dx(dy, weight, g, t, lora_A, *, scale, rank, p_drop=0.0, seed=0) -> Tensor:
    """dx [M, K] = (dy * g) W0 + scale * t A (with dropout: see dora_dx_kernel); g: [N] float32."""
    M, N = dy.shape
    K = weight.shape[1]
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    dropout = p_drop > 0.0
    # lora_matmul_kernel's tiles with the roles renamed: its BLOCK_N (output columns) is our BLOCK_K and its
    # BLOCK_K (reduction) our BLOCK_N; two accumulators with dropout, as DROPPED_X.
    tiles = dict(_matmul_tiles(M, dy.dtype, 0, two_accumulators=dropout))  # a copy: the cached one is shared
    tiles["BLOCK_N"], tiles["BLOCK_K"] = tiles["BLOCK_K"], tiles["BLOCK_N"]
    if dropout:  # the mask's hash beside two accumulators spills on 4 warps (16-bit tiles have 8 already; fp32's)
        tiles["num_warps"] = 8
        if tiles["BLOCK_M"] == 32:  # 3-4 stages: 2 STL at 64 registers on sm_90 (Triton 3.9); 2: none on 3.6 or 3.9
            tiles["num_stages"] = 2
    grid = (cdiv(M, tiles["BLOCK_M"]) * cdiv(K, tiles["BLOCK_K"]),)
    g = g.float().contiguous()
    traceable(dora_dx_kernel)[grid](
        dy, weight, g, t, lora_A, dx, seed, M, N, K, rank, float(scale), float(p_drop),
        *dy.stride(), *weight.stride(), *t.stride(),
        *lora_A.stride(), *dx.stride(),
        HAS_DROPOUT=dropout, DOT_PRECISION=dot_precision(dy.dtype), BLOCK_R=rank_block(rank), **tiles,
    )  # fmt: skip
    return dx


def col_dot(p: Tensor, q: Tensor) -> Tensor:
    """[N] float32 = sum over rows of p * q, a deterministic split-M sum."""
    M, N = p.shape
    block_m, block_n = 32, 128
    n_blocks = cdiv(N, block_n)
    splits, rows_per_split = row_splits(M, n_blocks, block_m)
    out = torch.empty(splits, N, device=p.device, dtype=torch.float32)
    traceable(col_dot_kernel)[(n_blocks, splits)](
        p, q, out, M, N, rows_per_split, *p.stride(), *q.stride(),
        *out.stride(), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out.sum(0) if splits > 1 else out[0]
