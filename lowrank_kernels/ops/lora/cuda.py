"""LoRA's primitives on the CUDA C++ extension (interface and math: ``naive.py``; the runtime: ``_cuda_ext.py``).

The dense product ``x W^T`` stays with cuBLAS (``F.linear``); every low-rank product runs on the extension's one
strided GEMM, dropout masks applied on load (shrink, weight gradients) or in the epilogue (``dx``). No fused
override: the forward is the shrink, cuBLAS and an in-place expand, three launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._cuda_ext import MASK_A, MASK_B, MASK_C, code, dropout_args, gemm, runtime, vector


def shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] float32 = drop(x) a[:rank]^T, zero past rank."""
    t = torch.zeros(x.shape[0], a.shape[0], device=x.device, dtype=torch.float32)
    gemm(runtime(x.device), x, a[:rank].t(), t[:, :rank], **dropout_args(MASK_A, p_drop, seed, x.shape[1]))
    return t


def lowrank_matmul(x, w, bias, t, u, v, *, scale, rank, p_drop=0.0, seed=0, epilogue_dropout=False, col_scale=None,
                   dropped_x=None, save_z=False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(y, z | None): cuBLAS ``x w^T``, then the low-rank term by the extension's GEMM in place (its epilogue applies
    the per-rank scale, the dropout mask, DoRA's ``g`` and the bias)."""
    rt = runtime(x.device)
    M, N = x.shape[0], w.shape[0]
    up = u[:, :rank].t()
    k_scale = vector(v, rank, "rank_scale")
    if col_scale is None:
        y = F.linear(x, w, bias)
        gemm(rt, t[:, :rank], up, y, alpha=scale, cin=y, beta=1.0, k_scale=k_scale,
             **(dropout_args(MASK_C, p_drop, seed, N) if epilogue_dropout else {}))  # fmt: skip
        return y, (y - bias if bias is not None else y.clone()) if save_z else None
    g = (col_scale[0].float() / col_scale[1].float()).contiguous()  # IEEE: g == 1 exactly when m == norm
    bias32 = vector(bias, N, "bias")
    if dropped_x is None:
        y = F.linear(x, w)
        if not save_z:
            gemm(rt, t[:, :rank], up, y, alpha=scale, cin=y, beta=1.0, post_scale=g, bias=bias32)
            return y, None
        z = torch.empty_like(y)
        gemm(rt, t[:, :rank], up, z, alpha=scale, cin=y, beta=1.0)
        y = z.float() * g
        return (y if bias32 is None else y + bias32).to(x.dtype), z
    # peft's dropout form: y = x w^T + bias + g z - drop(x) w^T, z = drop(x) w^T + low (xd: x with dropped zeros).
    keep = 1.0 / (1.0 - p_drop)
    y = F.linear(x, w, bias)
    dz = F.linear(dropped_x, w)  # drop(x) w^T * (1 - p)
    z = torch.empty(M, N, device=x.device, dtype=x.dtype)
    gemm(rt, t[:, :rank], up, z, alpha=scale, cin=dz, beta=keep)
    rt("dora_dropout_output", dtype=code(x), M=M, N=N, base=y.data_ptr(), base_s0=y.stride(0),
       base_s1=y.stride(1), z=z.data_ptr(), z_s0=z.stride(0), z_s1=z.stride(1), dz=dz.data_ptr(), dz_s0=dz.stride(0),
       dz_s1=dz.stride(1), dz_scale=keep, g=g.data_ptr(), out=y.data_ptr(), out_s0=y.stride(0),
       out_s1=y.stride(1))  # fmt: skip
    return y, z if save_z else None


def weight_grad(t, x, v, *, scale, rank_start, rank, p_drop=0.0, seed=0) -> Tensor:
    """[rank - rank_start, K] float32 = scale * (t * v)[:, rank_start:rank]^T drop(x)."""
    out = torch.empty(rank - rank_start, x.shape[1], device=x.device, dtype=torch.float32)
    row_scale = None if v is None else vector(v, rank, "rank_scale")[rank_start:]
    gemm(runtime(x.device), t[:, rank_start:rank].t(), x, out, alpha=scale, row_scale=row_scale,
         **dropout_args(MASK_B, p_drop, seed, x.shape[1]))  # fmt: skip
    return out
