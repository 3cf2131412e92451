"""LoRA's primitives on the CUDA C++ extension (interface and math: ``naive.py``; the bindings: ``_cuda_ext.py``).

The dense products ``x W^T`` stay with cuBLAS (``F.linear``); every low-rank product runs on the extension's one
strided GEMM (``csrc/gemm.cu``), x's dropout mask applied on load (shrink: operand A, weight gradients: operand B)
or in the epilogue (``dx``: operand C). No fused override: the forward is the shrink, cuBLAS and an in-place
low-rank epilogue, three launches. Outputs: ``t`` and the weight gradients in float32, ``y`` and ``z`` in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._cuda_ext import MASK_A, MASK_B, MASK_C, dora_dropout_output, dropout_on, gemm, vector
from .naive import keep_factor


def shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] float32 = drop(x) a[:rank]^T, zero past rank. x: [M, K], a: [R, K] (any strides)."""
    t = torch.zeros(x.shape[0], a.shape[0], device=x.device, dtype=torch.float32)
    gemm(x, a[:rank].t(), t[:, :rank], mask=dropout_on(MASK_A, p_drop, seed, cols=x.shape[1]))
    return t


def lowrank_matmul(x, w, bias, t, u, v, *, scale, rank, p_drop=0.0, seed=0, epilogue_dropout=False, col_scale=None,
                   dropped_x=None, save_z=False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(y [M, N], z [M, N] | None) in x's dtype, as ``naive.lowrank_matmul``: cuBLAS for ``x w^T`` (and
    ``dropped_x w^T``), then the low-rank term ``scale * (t * v)[:, :rank] u[:, :rank]^T`` by the extension's GEMM,
    whose epilogue adds it to the base product (``beta * cin``) and applies the dropout mask (``epilogue_dropout``:
    on the low-rank term only), DoRA's ``g`` (``post_scale``) and the bias."""
    N = w.shape[0]
    t_r, u_r = t[:, :rank], u[:, :rank].t()
    low = dict(alpha=scale, k_scale=vector(v, rank, "rank_scale"),
               mask=dropout_on(MASK_C, p_drop, seed, cols=N) if epilogue_dropout else None)  # fmt: skip
    if col_scale is None and dropped_x is None and not save_z:  # LoRA: y = x w^T + bias, then += low in place
        y = F.linear(x, w, bias)
        gemm(t_r, u_r, y, cin=y, beta=1.0, **low)
        return y, None
    g = None if col_scale is None else (col_scale[0].float() / col_scale[1].float()).contiguous()  # IEEE division
    bias32 = vector(bias, N, "bias")
    if dropped_x is None:
        # z = x w^T + low; y = g z + bias from the same float32 sum (not from z rounded), in place over x w^T, last.
        y = F.linear(x, w)
        z = None
        if save_z:
            z = torch.empty_like(y)
            gemm(t_r, u_r, z, cin=y, beta=1.0, **low)
        gemm(t_r, u_r, y, cin=y, beta=1.0, post_scale=g, bias=bias32, **low)
        return y, z
    # DoRA's dropout form, xd = x with its dropped entries zeroed (drop(x) = xd / (1 - p)):
    # z = drop(x) w^T + low, y = x w^T + bias + g z - drop(x) w^T.
    keep = keep_factor(p_drop)
    y = F.linear(x, w, bias)
    xd_w = F.linear(dropped_x, w)
    z = torch.empty_like(y)
    gemm(t_r, u_r, z, cin=xd_w, beta=keep, **low)
    g = g if g is not None else torch.ones(N, device=x.device, dtype=torch.float32)
    dora_dropout_output(y, z, xd_w, dz_scale=keep, g=g, out=y)
    return y, z if save_z else None


def weight_grad(t, x, v, *, scale, rank_start, rank, p_drop=0.0, seed=0) -> Tensor:
    """[rank - rank_start, K] float32 = scale * (t * v)[:, rank_start:rank]^T drop(x). t: [M, >=rank] float32,
    x: [M, K], v: [>=rank] | None."""
    out = torch.empty(rank - rank_start, x.shape[1], device=x.device, dtype=torch.float32)
    v32 = vector(v, rank, "rank_scale")
    gemm(t[:, rank_start:rank].t(), x, out, alpha=scale, row_scale=None if v32 is None else v32[rank_start:],
         mask=dropout_on(MASK_B, p_drop, seed, cols=x.shape[1]))  # fmt: skip
    return out
