"""The multi-adapter gather matmul's primitives on the CUDA C++ extension (interface and math: ``naive.py``).

cuBLAS for the base GEMM (in ``op.py``), then per-row gather shrink and expand kernels (``csrc/multi_lora.cu``) with
in-kernel slot skipping, and for training the segmented weight gradient kernel (one block per output tile of one
adapter, walking that adapter's rows once: deterministic). Dropout on the shrink's input goes through the
extension's ``dropout_combine`` (x with its dropped entries zeroed, exact; the keep factor on the fp32 result); the
DoRA training epilogues (``z``, peft's dropout form) and the backward's masked ``dx`` term are elementwise on the
expand kernel's low-rank product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._cuda_ext import check_inputs, code, dropout_combine, operand, ptr, runtime, vector
from ..lora.naive import keep_factor
from .naive import BatchTensors, dora_epilogue


def check_metadata(M: int, device: torch.device, **tensors: tuple[Tensor, torch.dtype, int]) -> None:
    for name, (t, dtype, n) in tensors.items():
        if t.dtype != dtype or t.dim() != 1 or t.shape[0] != n or t.stride(0) != 1 or t.device != device:
            raise ValueError(f"{name} must be a contiguous {dtype} [{n}] on {device}, got {tuple(t.shape)} "
                             f"{t.dtype} (stride {tuple(t.stride())}) on {t.device}")  # fmt: skip


def multi_lora_forward(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, row_slot, row_rank, row_scale,
                       sorted_rows, tiles, block_m) -> Tensor:  # fmt: skip
    """x: [M, K] -> y [M, N] in x's dtype (interface: ``reference.multi_lora.multi_lora_forward``).

    lora_A: [n, R, K], lora_B: [n, N, R] (the pool; any strides), magnitude_scale: [n, N] float32; the per-row
    metadata row_slot / row_rank (int32) and row_scale (float32) drive the kernels, one row at a time; the
    batch's sorted_rows / tiles / block_m (the Triton kernels' grouping) are not used here.
    """
    check_inputs(x.dtype, x.device, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    M, K = x.shape
    n_slots, R, K_pool = lora_A.shape
    N = weight.shape[0]
    if K_pool != K or tuple(lora_B.shape) != (n_slots, N, R):
        raise ValueError(f"pool shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} do not fit x [{M}, {K}], N={N}")
    if magnitude_scale.dtype != torch.float32 or tuple(magnitude_scale.shape) != (n_slots, N):
        raise ValueError(f"magnitude_scale must be float32 [{n_slots}, {N}], got {tuple(magnitude_scale.shape)} "
                         f"{magnitude_scale.dtype}")  # fmt: skip
    check_metadata(M, x.device, row_slot=(row_slot, torch.int32, M), row_rank=(row_rank, torch.int32, M),
                    row_scale=(row_scale, torch.float32, M), dora_slots=(dora_slots, torch.int32, n_slots))  # fmt: skip
    y = F.linear(x, weight, bias)
    if M == 0 or n_slots == 0 or R == 0:
        return y
    slot_rows = torch.zeros(n_slots, 2, dtype=torch.int32, device=x.device)  # unread by the forward
    meta = BatchTensors(row_slot, row_rank, row_scale, sorted_rows, tiles, slot_rows, block_m)
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)  # rows without adapter: never written, never read
    _shrink_launch(x, lora_A, meta, t)
    _expand_launch(y, t, lora_B, meta, magnitude_scale, dora_slots, bias)
    return y


# ---- the primitives op.py's orchestration runs on (naive.py's interface) ----------------------------------------


def _shrink_launch(x: Tensor, a: Tensor, meta: BatchTensors, t: Tensor) -> None:
    n_slots, R, K = a.shape
    runtime(x.device)(
        "multi_lora_shrink", dtype=code(x), M=x.shape[0], K=K, capacity=n_slots, max_rank=R, **operand("x", x),
        **operand("a", a), row_slot=meta.row_slot.data_ptr(), row_rank=meta.row_rank.data_ptr(),
        row_scale=meta.row_scale.data_ptr(), **operand("t", t),
    )  # fmt: skip


def segment_shrink(x: Tensor, a: Tensor, meta: BatchTensors, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] float32 = s_t drop(x[t]) a[i_t, :b_t]^T, zero past b_t and on rows without adapter."""
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
    check_inputs(x.dtype, x.device, x=x, a=a)
    M = x.shape[0]
    t = torch.zeros(M, a.shape[1], device=x.device, dtype=torch.float32)
    if M == 0:
        return t
    if p_drop > 0.0:
        dropped = torch.empty_like(x)
        dropout_combine(None, x, dropped, scale_kept=False, p=p_drop, seed=seed)
        _shrink_launch(dropped, a, meta, t)
        return t * keep_factor(p_drop)
    _shrink_launch(x, a, meta, t)
    return t


def _expand_launch(y: Tensor, t: Tensor, u: Tensor, meta: BatchTensors, g: Tensor, dora_slots: Tensor,
                   bias: Tensor | None) -> None:  # fmt: skip
    M, N = y.shape
    n_slots, _, R = u.shape
    bias32 = vector(bias, N, "bias")
    runtime(y.device)(
        "multi_lora_expand", dtype=code(y), M=M, N=N, capacity=n_slots, max_rank=R, **operand("t", t),
        **operand("b", u), row_slot=meta.row_slot.data_ptr(), row_rank=meta.row_rank.data_ptr(),
        dora_slots=dora_slots.data_ptr(), **operand("g", g), bias=ptr(bias32), **operand("y", y),
    )  # fmt: skip


def segment_expand(y, t, u, meta: BatchTensors, *, p_drop=0.0, seed=0, dora=None, bias=None, yd=None,
                   save_z=False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(y + low, z | None) as ``naive.segment_expand``; the serving forms update y in place."""
    if u.dtype != y.dtype:
        u = u.to(y.dtype)
    check_inputs(y.dtype, y.device, y=y, u=u)
    M, N = y.shape
    n_slots = u.shape[0]
    t = t.to(torch.float32)
    if M == 0:
        return y, (torch.zeros_like(y) if save_z else None)
    no_dora = torch.zeros(n_slots, dtype=torch.int32, device=y.device)
    ones = torch.ones(n_slots, N, dtype=torch.float32, device=y.device)
    serving = p_drop == 0.0 and yd is None and not save_z
    if serving:  # the kernel's own epilogue: y += low, DoRA slots g (y - bias + low) + bias
        g, dora_slots = dora if dora is not None else (ones, no_dora)
        _expand_launch(y, t, u, meta, g.to(torch.float32), dora_slots, bias if dora is not None else None)
        return y, None
    low = torch.zeros_like(y)
    _expand_launch(low, t, u, meta, ones, no_dora, None)
    if dora is None:
        if p_drop > 0.0:  # the backward's dx: y + drop'(low)
            dropout_combine(y, low, y, scale_kept=True, p=p_drop, seed=seed)
            return y, (torch.zeros_like(y) if save_z else None)
        return y.add_(low), (torch.zeros_like(y) if save_z else None)
    g, dora_slots = dora
    idx = meta.row_slot.long().clamp_min(0)
    is_dora = ((meta.row_slot >= 0) & (dora_slots.long()[idx] != 0)).unsqueeze(-1)
    out, z = dora_epilogue(y.float(), low.float(), torch.where(is_dora, g[idx].float(), 1.0), is_dora, bias,
                           None if yd is None else yd.float())  # fmt: skip
    return out.to(y.dtype), (z.to(y.dtype) if save_z else None)


def segment_weight_grad(u: Tensor, v: Tensor, meta: BatchTensors, capacity: int, *, p_drop: float = 0.0,
                        seed: int = 0) -> Tensor:  # fmt: skip
    """[capacity, P, Q] float32 per slot ``sum over its rows of u[t]^T drop(v[t])`` (``csrc``'s segment_grad)."""
    check_inputs(u.dtype, u.device, u=u)
    check_inputs(v.dtype, u.device, v=v)
    M, P = u.shape
    Q = v.shape[1]
    out = torch.empty(capacity, P, Q, device=u.device, dtype=torch.float32)
    runtime(u.device)(
        "multi_lora_segment_grad", u_dtype=code(u), v_dtype=code(v), M=M, P=P, Q=Q, capacity=capacity,
        **operand("u", u), **operand("v", v), sorted_rows=meta.sorted_rows.data_ptr(),
        slot_rows=meta.slot_rows.data_ptr(), seed=int(seed) & 0xFFFFFFFF, p=float(p_drop), **operand("out", out),
    )  # fmt: skip
    return out
