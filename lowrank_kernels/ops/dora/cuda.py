"""DoRA's primitives on the CUDA C++ extension (interface and math: ``naive.py``), beside LoRA's (``ops/lora/cuda.py``).

The row norm, factored: ``G = A A^T``, ``Q = s^2 B G`` and ``C = 2s W0 A^T + Q`` ([N, b] float32, three GEMMs on
the extension), then per row ``||W0_n||^2 + B_n . C_n`` and the sum it is judged against, ``||W0_n||^2 + B_n . Q_n``
(``dora_norm_finish``, one pass over W0 when ``||W0_n||^2`` is not cached): ``W0 + s B A`` is never formed. Rows
that cancelled are recomputed directly, a few rows at a time (``naive.fix_cancelled_rows``, one host sync). The
dense products ``dy W0`` of ``dx`` are cuBLAS's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _cuda_ext
from ..._cuda_ext import dropout_combine, gemm, vector
from ..lora.cuda import lowrank_matmul, shrink, weight_grad
from . import naive

__all__ = ["lowrank_matmul", "shrink", "weight_grad"]  # LoRA's primitives, beside DoRA's own


def row_norm(weight, lora_A, lora_B, weight_norm_sq, *, scale, rank) -> Tensor:
    """[N] float32 = ||W0 + scale B[:, :rank] A[:rank]||_row; weight_norm_sq: [N] float32 ``||W0_n||^2`` | None."""
    N = weight.shape[0]
    A, B = lora_A[:rank], lora_B[:, :rank]
    f32 = dict(device=weight.device, dtype=torch.float32)
    gram = torch.empty(rank, rank, **f32)
    gemm(A, A.t(), gram)  # G = A A^T
    quad = torch.empty(N, rank, **f32)
    gemm(B, gram, quad, alpha=scale * scale)  # Q = s^2 B G
    cross = torch.empty(N, rank, **f32)
    gemm(weight, A.t(), cross, alpha=2.0 * scale, cin=quad, beta=1.0)  # C = 2s W0 A^T + Q
    norm_sq, reference_sq = _cuda_ext.dora_norm_finish(weight, vector(weight_norm_sq, N, "weight_norm_sq"), B,
                                                       cross, quad)  # fmt: skip
    return naive.fix_cancelled_rows(norm_sq, reference_sq, weight, lora_A, lora_B, scale=scale, rank=rank)


def dropout_shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float, seed: int) -> tuple[Tensor, Tensor]:
    """(xd [M, K] = x with its dropped entries zeroed, unscaled, in x's dtype; t [M, R] float32 = drop(x) a[:rank]^T,
    zero past rank)."""
    xd = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dropout_combine(None, x, xd, scale_kept=False, p=p_drop, seed=seed)
    return xd, shrink(x, a, rank, p_drop=p_drop, seed=seed)


def dora_dx(dy, weight, g, t, lora_A, *, scale, rank, p_drop=0.0, seed=0) -> Tensor:
    """dx [M, K] in dy's dtype = (dy * g) W0 + s t[:, :rank] A[:rank]; with dropout dy W0 + drop'((dy * (g - 1)) W0
    + s t A). dy: [M, N], g: [N], t = (dy * g) B: [M, >=rank] float32. cuBLAS for the dense parts."""
    g = g.float()
    A = lora_A[:rank]
    if p_drop == 0.0:
        dx = torch.mm((dy.float() * g).to(dy.dtype), weight)
        gemm(t[:, :rank], A, dx, alpha=scale, cin=dx, beta=1.0)
        return dx
    dx = torch.mm(dy, weight)
    inner = torch.mm((dy.float() * (g - 1.0)).to(dy.dtype), weight)
    gemm(t[:, :rank], A, inner, alpha=scale, cin=inner, beta=1.0)  # (dy * (g - 1)) W0 + s t A
    dropout_combine(dx, inner, dx, scale_kept=True, p=p_drop, seed=seed)  # dx += drop'(inner)
    return dx


def col_dot(p: Tensor, q: Tensor) -> Tensor:
    """[N] float32 = sum over rows of p * q (DoRA's magnitude gradient: ``sum_rows(dy * z)``)."""
    return _cuda_ext.col_dot(p, q)
