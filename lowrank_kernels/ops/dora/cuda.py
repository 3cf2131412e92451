"""DoRA's primitives on the CUDA C++ extension (interface and math: ``naive.py``), beside LoRA's (``ops/lora/cuda.py``).

The row norm: ``C = 2s W0 A^T + s^2 B (A A^T)`` ([N, b], two GEMMs and the Gram matrix), then
``sqrt(||W0_n||^2 + B_n . C_n)`` per row (``dora_norm_finish``): ``W0 + s B A`` is never formed; rows that cancelled
are recomputed directly by the reference's chunked helper (one host sync: this is the fallback path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._cuda_ext import code, dropout_combine, gemm, ptr, runtime, vector
from ..._cuda_ext import col_dot as _col_dot
from ..lora.cuda import lowrank_matmul, shrink, weight_grad
from . import naive

__all__ = ["lowrank_matmul", "shrink", "weight_grad"]  # LoRA's primitives, beside DoRA's own


def row_norm(weight, lora_A, lora_B, weight_norm_sq, *, scale, rank) -> Tensor:
    """[N] float32 = ||W0 + scale B[:, :rank] A[:rank]||_row, factored; weight_norm_sq: [N] float32 | None."""
    rt = runtime(weight.device)
    N, K = weight.shape
    A, B = lora_A[:rank], lora_B[:, :rank]
    c = torch.empty(N, rank, device=weight.device, dtype=torch.float32)
    gemm(rt, weight, A.t(), c, alpha=2.0 * scale)  # 2s W0 A^T
    gram = torch.empty(rank, rank, device=weight.device, dtype=torch.float32)
    gemm(rt, A, A.t(), gram)  # G = A A^T
    quad = torch.empty(N, rank, device=weight.device, dtype=torch.float32)
    gemm(rt, B, gram, quad, alpha=scale * scale)  # s^2 B G
    c += quad
    w0sq = vector(weight_norm_sq, N, "weight_norm_sq")
    if w0sq is None:
        w0sq = naive.weight_norm_sq(weight).float()
    norm = torch.empty(N, device=weight.device, dtype=torch.float32)
    rt("dora_norm_finish", dtype=code(weight), N=N, K=K, rank=rank, w=weight.data_ptr(), w_s0=weight.stride(0),
       w_s1=weight.stride(1), w0sq=ptr(w0sq), b=B.data_ptr(), b_s0=B.stride(0), b_s1=B.stride(1),
       c=c.data_ptr(), c_s0=c.stride(0), c_s1=c.stride(1), out=norm.data_ptr())  # fmt: skip
    reference_sq = w0sq + (quad * B.float()).sum(1)
    return naive.fix_cancelled_rows(norm.square(), reference_sq, weight, lora_A, lora_B, scale=scale, rank=rank)


def dropout_shrink(x: Tensor, lora_A: Tensor, rank: int, *, p_drop: float, seed: int) -> tuple[Tensor, Tensor]:
    """(xd = x with its dropped entries zeroed, xa = drop(x) A[:rank]^T float32)."""
    xd = torch.empty_like(x, memory_format=torch.contiguous_format)
    dropout_combine(runtime(x.device), None, x, xd, scale_kept=False, p=p_drop, seed=seed)
    return xd, shrink(x, lora_A, rank, p_drop=p_drop, seed=seed)


def dora_dx(dy, weight, g, t, lora_A, *, scale, rank, p_drop=0.0, seed=0) -> Tensor:
    """dx = (dy * g) W0 + s t A, with dropout dy W0 + drop'((dy * (g - 1)) W0 + s t A): cuBLAS for the dense parts."""
    rt = runtime(dy.device)
    g = g.float()
    A = lora_A[:rank]
    if p_drop == 0.0:
        dx = torch.mm((dy.float() * g).to(dy.dtype), weight)
        gemm(rt, t[:, :rank], A, dx, alpha=scale, cin=dx, beta=1.0)
        return dx
    dx = torch.mm(dy, weight)
    inner = torch.mm((dy.float() * (g - 1.0)).to(dy.dtype), weight)
    gemm(rt, t[:, :rank], A, inner, alpha=scale, cin=inner, beta=1.0)
    dropout_combine(rt, dx, inner, dx, scale_kept=True, p=p_drop, seed=seed)
    return dx


def col_dot(p: Tensor, q: Tensor) -> Tensor:
    """[N] float32 = sum over rows of p * q."""
    return _col_dot(runtime(p.device), p, q)
