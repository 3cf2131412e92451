"""Triton kernels for DoRA (``y = g * (x W0^T + s (x A[:b]^T) B[:, :b]^T) + bias``, ``g = m / ||W0 + s B A||_row``)
and their launchers.

Math, the dropout form and the backward: ``lowrank_kernels/reference/dora.py``. DoRA reuses the LoRA kernels
(``kernels/lora.py``) wherever the math is LoRA's, and adds five:

- ``dora_norm_kernel``: the detached row norm by the factored formula, one pass over W0 (``U = W0 A^T`` accumulated
  tile by tile, never an [N, K] temporary), ``||W0_n||^2`` from the caller's cache or from the same tiles.
- ``dora_dropout_shrink_kernel``: with dropout, ``xd = x * keep`` (the mask drawn once per element) and
  ``xa = drop(x) A^T`` in one pass over x, for the GEMM's second accumulator.
- ``dora_epilogue_kernel``: above M = 64 the base GEMM is cuBLAS (as for LoRA); this adds the rank-b term, applies g
  and the bias in one read and one write of y (LoRA's in-place ``addmm_`` costs the same bytes).
- ``dora_dx_kernel``: ``dx = (dy * g) W0 + s t A`` (dropout: ``dy W0 + drop'((dy * (g - 1)) W0 + s t A)``), the
  scale g applied to dy's tiles along the reduction, so no [M, N] ``dy * g`` is ever formed.
- ``dora_magnitude_grad_kernel``: ``sum_rows(dy * (y - bias))`` (dropout: ``sum_rows(dy * z)``), split over rows.

Forward without dropout: at M <= 64 one ``lora_matmul_kernel`` launch (shrink fused) with the column scale
``m / norm`` in its epilogue; above, LoRA's strategies with g applied in the epilogue. With dropout (training) the
GEMM's second accumulator takes ``drop(x) W0^T`` from the same W0 tiles (peft runs the base GEMM twice).
Backward: LoRA's shrink (``dy (g B)``) and weight-gradient kernels, ``dora_dx_kernel``, the dm reduction.
The rank ``b`` is a runtime argument throughout (masked loads, runtime loop bounds), as in the LoRA kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lora import (
    FUSED_SHRINK_MAX_M,
    FUSED_SHRINK_MAX_RANK,
    SHARED_MEMORY_BUDGET,
    _dot_precision,
    _dropout_keep,
    _launch_matmul,
    _launch_shrink,
    _launch_weight_grad,
    _matmul_tiles,
    _rank_block,
    use_cublas_gemm,
)


@triton.jit
def dora_norm_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    gram_ptr,
    w0sq_ptr,
    norm_ptr,
    N,
    K,
    rank,
    scale,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_gi,
    stride_gj,
    HAS_W0SQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """norm[n] = sqrt(||W_n||^2 + 2 s <B_n, U_n> + s^2 B_n G B_n^T), U = W A[:rank]^T, fp32.

    W: [N, K], A: [R, K], B: [N, R], G: [rank, rank] float32 = A[:rank] A[:rank]^T, w0sq: [N] float32 (HAS_W0SQ;
    otherwise summed from the W tiles this pass reads anyway), norm: [N] float32.
    U is accumulated over K a BLOCK_R-rank chunk at a time (one chunk, so one pass over W, up to R = 128) and only
    its dot with B's chunk is kept; the quadratic term needs B and G alone. Grid: (cdiv(N, BLOCK_N),).
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
    # IEEE sqrt (not the fast one): with B = 0 the norm equals sqrt(||W0_n||^2) bit for bit, so a fresh layer's
    # g = m / norm is exactly 1.
    tl.store(norm_ptr + o_n, tl.sqrt_rn(tl.maximum(b_nsq, 0.0)), mask=m_n)


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def dora_dropout_shrink_kernel(
    x_ptr,
    a_ptr,
    xd_ptr,
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
    stride_xdm,
    stride_xdk,
    stride_tm,
    stride_tr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
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
        b_x = tl.where(_dropout_keep(seed, p_drop, o_m, o_k, K), b_x, 0.0)
        if pid_r == 0:
            tl.store(xd_ptr + o_m[:, None] * stride_xdm + o_k[None, :] * stride_xdk, b_x, mask=m_mk)
        p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak
        b_a = tl.load(p_a, mask=m_r[:, None] & (o_k < K)[None, :], other=0.0)
        b_acc = tl.dot(b_x, tl.trans(b_a), b_acc, input_precision=DOT_PRECISION)
    b_acc *= 1.0 / (1.0 - p_drop)
    p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
    tl.store(p_t, b_acc, mask=m_m[:, None] & (o_r[None, :] < R))


@triton.jit
def dora_epilogue_kernel(
    y_ptr,
    t_ptr,
    u_ptr,
    num_ptr,
    den_ptr,
    bias_ptr,
    M,
    N,
    rank,
    scale,
    stride_ym,
    stride_yn,
    stride_tm,
    stride_tr,
    stride_un,
    stride_ur,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """In place: y = g * (y + scale * t[:, :rank] U[:, :rank]^T) + bias, g = num / den (fp32 arithmetic).

    y: [M, N] (holds x W0^T from cuBLAS), t: [M, >=rank] float32, U: [N, >=rank], num, den, bias: [N].
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    p_y = y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn
    b_acc = tl.load(p_y, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        o_r = r_start + tl.arange(0, BLOCK_R)
        m_r = o_r < rank
        p_t = t_ptr + o_m[:, None] * stride_tm + o_r[None, :] * stride_tr
        b_t = tl.load(p_t, mask=m_m[:, None] & m_r[None, :], other=0.0)
        p_u = u_ptr + o_n[:, None] * stride_un + o_r[None, :] * stride_ur
        b_u = tl.load(p_u, mask=m_n[:, None] & m_r[None, :], other=0.0)
        b_acc = tl.dot((b_t * scale).to(b_u.dtype), tl.trans(b_u), b_acc, input_precision=DOT_PRECISION)
    b_num = tl.load(num_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_den = tl.load(den_ptr + o_n, mask=m_n, other=1.0).to(tl.float32)
    b_acc *= tl.div_rn(b_num, b_den)[None, :]
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["seed"])  # an int equal to 1 would become a constexpr
def dora_dx_kernel(
    dy_ptr,
    w_ptr,
    g_ptr,
    t_ptr,
    a_ptr,
    dx_ptr,
    seed,
    M,
    N,
    K,
    rank,
    scale,
    p_drop,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_tm,
    stride_tr,
    stride_ar,
    stride_ak,
    stride_dxm,
    stride_dxk,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """DoRA's input gradient, fp32 accumulation:

        dx = (dy * g) W + scale * t[:, :rank] A[:rank]                              without dropout
        dx = dy W + drop'((dy * (g - 1)) W + scale * t[:, :rank] A[:rank])          HAS_DROPOUT

    dy: [M, N], W: [N, K], g: [N] float32, t = (dy * g) B: [M, >=rank] float32, A: [R, K], dx: [M, K]; ``drop'``
    multiplies by the forward's dropout mask at x's (m, k), 1/(1-p) included. The reduction runs over N in BLOCK_N
    steps; g scales dy's tiles as they are loaded. Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K),), grouped by GROUP_M.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    num_pid_in_group = GROUP_M * num_pid_k
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_k = (pid % num_pid_in_group) // group_size_m

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
        b_acc += tl.where(_dropout_keep(seed, p_drop, o_m, o_k, K), b_low * (1.0 / (1.0 - p_drop)), 0.0)
    else:
        b_acc = b_low
    p_dx = dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk
    tl.store(p_dx, b_acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def dora_magnitude_grad_kernel(
    dy_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    rows_per_split,
    stride_dym,
    stride_dyn,
    stride_zm,
    stride_zn,
    stride_os,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[s, n] = sum_{m in split s} dy[m, n] * (z[m, n] - bias[n]) in fp32 (no bias term unless HAS_BIAS).

    dy, z: [M, N], bias: [N], out: [splits, N] float32 (summed over s by the launcher: deterministic).
    Grid: (cdiv(N, BLOCK_N), splits).
    """
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_s = tl.program_id(1).to(tl.int64)
    m_n = o_n < N
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m_start in range(m_begin, m_end, BLOCK_M):
        o_m = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mn = (o_m < m_end)[:, None] & m_n[None, :]
        b_dy = tl.load(dy_ptr + o_m[:, None] * stride_dym + o_n[None, :] * stride_dyn, mask=m_mn, other=0.0)
        b_z = tl.load(z_ptr + o_m[:, None] * stride_zm + o_n[None, :] * stride_zn, mask=m_mn, other=0.0)
        b_z = b_z.to(tl.float32)
        if HAS_BIAS:
            b_z -= b_bias[None, :]
        b_acc += tl.sum(b_dy.to(tl.float32) * b_z, axis=0)
    tl.store(out_ptr + pid_s * stride_os + o_n * stride_on, b_acc, mask=m_n)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: allocation, tile choice, grid. No autograd, no input validation (the ops layer does it).
# ----------------------------------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A, lora_B, weight_norm_sq, scale, rank) -> Tensor:  # fmt: skip
    """[N] float32 = ||W0 + scale B[:, :rank] A[:rank]||_row (one pass over W0, nothing [N, K] allocated).

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
    block_n, block_k = 32, 64 if weight.dtype == torch.float32 else 128
    block_r = min(128, max(16, triton.next_power_of_2(R)))
    stages = max(1, min(4, SHARED_MEMORY_BUDGET // ((block_n + block_r) * block_k * weight.dtype.itemsize)))
    w0sq = weight_norm_sq if weight_norm_sq is not None else norm  # unread without HAS_W0SQ
    dora_norm_kernel[(triton.cdiv(N, block_n),)](
        weight, lora_A, lora_B, gram, w0sq, norm, N, K, rank, float(scale),
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        gram.stride(0), gram.stride(1),
        HAS_W0SQ=weight_norm_sq is not None, DOT_PRECISION=_dot_precision(weight.dtype),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_G=32, num_warps=4, num_stages=stages,
    )  # fmt: skip
    return norm


def _launch_dropout_shrink(x: Tensor, lora_A: Tensor, rank: int, *, p_drop: float, seed: int) -> tuple[Tensor, Tensor]:
    """(xd [M, K] = x * keep in x's dtype, xa [M, R] float32 = drop(x) A[:rank]^T, zero past rank)."""
    M, K = x.shape
    R = lora_A.shape[0]
    xd = torch.empty(M, K, device=x.device, dtype=x.dtype)
    xa = torch.empty(M, R, device=x.device, dtype=torch.float32)
    # A memory-bound pass over x: 16-row tiles keep >= 2 programs per SM (132 on an H100) up to M = 4224; the
    # hash over a [64, 128] tile would take 247 registers a thread (ptxas, sm_90), [16, 128] 88.
    block_m, block_r = (16 if triton.cdiv(M, 16) <= 264 else 32), _rank_block(R)
    dora_dropout_shrink_kernel[(triton.cdiv(M, block_m), triton.cdiv(R, block_r))](
        x, lora_A, xd, xa, seed, M, K, R, rank, float(p_drop),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xd.stride(0), xd.stride(1),
        xa.stride(0), xa.stride(1), DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_K=64 if x.dtype == torch.float32 else 128, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return xd, xa


def _launch_epilogue(y, t, u, magnitude, weight_norm, bias, *, scale, rank) -> None:
    """In place on y [M, N]: y = (m / norm) * (y + scale * t[:, :rank] u[:, :rank]^T) + bias."""
    M, N = y.shape
    block_m, block_n = 64, 128
    dora_epilogue_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        y, t, u, magnitude, weight_norm, bias if bias is not None else y, M, N, rank, float(scale),
        y.stride(0), y.stride(1), t.stride(0), t.stride(1), u.stride(0), u.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(y.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_rank_block(rank), num_warps=4,
    )  # fmt: skip


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, dropout_p, seed,
                 ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """x: [M, K] -> (y [M, N], xa [M, R] float32, z [M, N] with dropout / empty [0] without); see reference.

    Without dropout: at M <= 64 one ``lora_matmul_kernel`` launch (shrink fused, g in the epilogue); above, a
    shrink, cuBLAS ``x W0^T`` and ``dora_epilogue_kernel`` (``use_cublas_gemm``), or a shrink and our GEMM with g in
    its epilogue. With dropout (training) at every M: ``dora_dropout_shrink_kernel`` (xd and xa), then our GEMM,
    whose second accumulator reads each W0 tile once for x and drop(x) (peft runs two base GEMMs).
    """
    M = x.shape[0]
    N, R = lora_B.shape
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if dropout_p > 0.0:
        xd, xa = _launch_dropout_shrink(x, lora_A, rank, p_drop=dropout_p, seed=seed)
        z = torch.empty(M, N, device=x.device, dtype=x.dtype)
        _launch_matmul(x, weight, bias, xa, lora_B, None, None, y, scale=scale, rank=rank, fuse_shrink=False,
                       shrink_dropout=False, epilogue_dropout=False, p_drop=dropout_p, seed=seed,
                       col_scale=(magnitude, weight_norm), xd=xd, z=z)  # fmt: skip
        return y, xa, z
    fuse = M <= FUSED_SHRINK_MAX_M and R <= FUSED_SHRINK_MAX_RANK
    if not fuse and use_cublas_gemm(M):
        xa = _launch_shrink(x, lora_A, rank)
        y = torch.nn.functional.linear(x, weight)
        _launch_epilogue(y, xa, lora_B, magnitude, weight_norm, bias, scale=scale, rank=rank)
        return y, xa, x.new_empty(0)
    if fuse:
        xa = torch.zeros(M, R, device=x.device, dtype=torch.float32)  # column block 0 writes xa[:, :rank]
    else:
        xa = _launch_shrink(x, lora_A, rank)
    _launch_matmul(x, weight, bias, xa, lora_B, None, lora_A if fuse else None, y, scale=scale, rank=rank,
                   fuse_shrink=fuse, shrink_dropout=False, epilogue_dropout=False, p_drop=0.0, seed=seed,
                   col_scale=(magnitude, weight_norm))  # fmt: skip
    return y, xa, x.new_empty(0)


def _launch_dx(dy, weight, g, t, lora_A, dx, *, scale, rank, p_drop, seed) -> None:
    """dx [M, K] = (dy * g) W0 + scale * t A (with dropout: see dora_dx_kernel)."""
    M, N = dy.shape
    K = weight.shape[1]
    dropout = p_drop > 0.0
    # lora_matmul_kernel's tiles with the roles renamed: its BLOCK_N (output columns) is our BLOCK_K and its
    # BLOCK_K (reduction) our BLOCK_N; two accumulators with dropout, as DROPPED_X.
    tiles = _matmul_tiles(M, dy.dtype, 0, two_accumulators=dropout)
    tiles["BLOCK_N"], tiles["BLOCK_K"] = tiles["BLOCK_K"], tiles["BLOCK_N"]
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(K, tiles["BLOCK_K"]),)
    dora_dx_kernel[grid](
        dy, weight, g, t, lora_A, dx, seed, M, N, K, rank, float(scale), float(p_drop),
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        HAS_DROPOUT=dropout, DOT_PRECISION=_dot_precision(dy.dtype), BLOCK_R=_rank_block(rank), **tiles,
    )  # fmt: skip


def _launch_magnitude_grad(dy: Tensor, z: Tensor, bias: Tensor | None) -> Tensor:
    """[N] float32 = sum over rows of dy * (z - bias), a deterministic split-M sum."""
    M, N = dy.shape
    block_m, block_n = 32, 128
    n_blocks = triton.cdiv(N, block_n)
    # ~2 programs per SM on a 132-SM H100, at least 256 rows per split.
    splits = max(1, min(triton.cdiv(264, n_blocks), triton.cdiv(M, 256)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    out = torch.empty(splits, N, device=dy.device, dtype=torch.float32)
    dora_magnitude_grad_kernel[(n_blocks, splits)](
        dy, z, bias if bias is not None else dy, out, M, N, rows_per_split,
        dy.stride(0), dy.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return out.sum(0) if splits > 1 else out[0]


def dora_backward(grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, scale, rank,
                  grad_rank_start, dropout_p, seed, needs_dx=True, needs_dAB=True, needs_dm=True):  # fmt: skip
    """Returns (dx [M, K], dA [R, K], dB [N, R], dm [N]), each empty [0] unless needed; see reference.dora_backward.

    g enters the shrink through ``B * g`` ([N, R]) and dx through its tiles of dy: nothing [M, N] is allocated.
    """
    dy = grad_out
    g = magnitude.float() / weight_norm.float()  # [N]
    dx, dA, dB, dm = (x.new_empty(0) for _ in range(4))  # distinct tensors: custom-op outputs may not alias
    if needs_dx or needs_dAB:
        dyb = _launch_shrink(dy, (lora_B.float() * g[:, None]).to(dy.dtype).t(), rank)  # [M, R] = (dy * g) B
    if needs_dx:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        _launch_dx(dy, weight, g, dyb, lora_A, dx, scale=scale, rank=rank, p_drop=dropout_p, seed=seed)
    if needs_dAB:
        dA = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
        dB = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
        grad_args = dict(scale=scale, rank_start=grad_rank_start, rank=rank)
        dA[grad_rank_start:rank] = _launch_weight_grad(dyb, x, None, p_drop=dropout_p, seed=seed, **grad_args)
        dB[:, grad_rank_start:rank] = _launch_weight_grad(xa, dy, None, **grad_args).t() * g[:, None]
    if needs_dm:
        if dropout_p == 0.0:  # saved = y; z = (y - bias) / g, so sum(dy z) / norm = sum(dy (y - bias)) / m
            total, m = _launch_magnitude_grad(dy, saved, bias), magnitude.float()
            dm = torch.where(m != 0, total / m, torch.zeros_like(total))
        else:  # saved = z
            dm = _launch_magnitude_grad(dy, saved, None) / weight_norm.float()
        dm = dm.to(magnitude.dtype)
    return dx, dA, dB, dm
