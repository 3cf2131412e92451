"""The multi-adapter gather matmul on the CUDA C++ extension (interface and math: ``naive.py``): cuBLAS for the base
GEMM, then per-row gather shrink and expand kernels (``csrc/multi_lora.cu``) with in-kernel slot skipping."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._cuda_ext import check_inputs, code, ptr, runtime, vector


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
    rt = runtime(x.device)
    y = F.linear(x, weight, bias)
    if M == 0 or n_slots == 0 or R == 0:
        return y
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)  # rows without adapter: never written, never read
    dtype = code(x)
    rt("multi_lora_shrink", dtype=dtype, M=M, K=K, capacity=n_slots, max_rank=R, x=x.data_ptr(), x_s0=x.stride(0),
       x_s1=x.stride(1), a=lora_A.data_ptr(), a_s0=lora_A.stride(0), a_s1=lora_A.stride(1), a_s2=lora_A.stride(2),
       row_slot=row_slot.data_ptr(), row_rank=row_rank.data_ptr(), row_scale=row_scale.data_ptr(), t=t.data_ptr(),
       t_s0=t.stride(0), t_s1=t.stride(1))  # fmt: skip
    bias32 = vector(bias, N, "bias")
    rt("multi_lora_expand", dtype=dtype, M=M, N=N, capacity=n_slots, max_rank=R, t=t.data_ptr(), t_s0=t.stride(0),
       t_s1=t.stride(1), b=lora_B.data_ptr(), b_s0=lora_B.stride(0), b_s1=lora_B.stride(1), b_s2=lora_B.stride(2),
       row_slot=row_slot.data_ptr(), row_rank=row_rank.data_ptr(), dora_slots=dora_slots.data_ptr(),
       g=magnitude_scale.data_ptr(), g_s0=magnitude_scale.stride(0), g_s1=magnitude_scale.stride(1),
       bias=ptr(bias32), y=y.data_ptr(), y_s0=y.stride(0), y_s1=y.stride(1))  # fmt: skip
    return y
