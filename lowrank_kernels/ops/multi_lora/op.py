"""Mixed-adapter batched inference as a ``torch.library`` op, and the functional entry point ``multi_lora_linear``.

``lowrank_kernels::multi_lora_fwd`` is a custom op with a fake (meta) implementation, so ``torch.compile`` traces
it; its body hands the inputs to the backend chosen by ``lowrank_kernels.backend`` (gather-bmm reference in
``lowrank_kernels.reference.multi_lora``, segmented Triton kernels in ``lowrank_kernels.kernels.multi_lora``,
per-row CUDA C++ kernels in ``lowrank_kernels.kernels.cuda_ext``).
Inference only: serving frozen adapters has no backward (the op is not differentiable; LoRALinear trains).

The per-layer path is host-only arithmetic on facts fixed when the batch was built (``AdapterBatch``): no
``.item()``, no ``nonzero``, no host copy, so it runs inside a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backend
from . import naive as reference
from .batch import AdapterBatch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def implementation(name: str):
    """The module holding this op's primitives on backend ``name``; Triton and the extension load on first use."""
    if name == "triton":
        from . import triton

        return triton
    if name == "cuda":
        from . import cuda

        return cuda
    return reference


@torch.library.custom_op("lowrank_kernels::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude_scale: Tensor,
    dora_slots: Tensor,
    row_slot: Tensor,
    row_rank: Tensor,
    row_scale: Tensor,
    sorted_rows: Tensor,
    tiles: Tensor,
    block_m: int,
    has_adapter: bool,
) -> Tensor:
    """x: [M, K] -> y [M, N]; the pool's tensors, then the batch's (``AdapterBatch``), see the reference.

    ``has_adapter`` False (every row -1): the bare ``F.linear``, no adapter launch (in a CUDA-graph capture too).
    """
    if x.shape[0] == 0 or not has_adapter:
        return F.linear(x, weight, bias)
    bias = None if bias is None else bias.contiguous()  # 1-D vectors reach the kernels contiguous
    args = (x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, row_slot, row_rank, row_scale, sorted_rows,
            tiles, block_m)  # fmt: skip
    impl = implementation(backend.choose("multi_lora_fwd", x.device, (x, weight, bias, lora_A, lora_B)))
    return impl.multi_lora_forward(*args)


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, row_slot, row_rank, row_scale, sorted_rows, tiles,
      block_m, has_adapter):  # fmt: skip
    return x.new_empty(x.shape[0], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Functional API: host-side checks of shapes, dtypes, devices and the batch/pool match; nothing here syncs.
# ----------------------------------------------------------------------------------------------------------------


def check_multi_lora_inputs(x, weight, bias, pool, batch) -> None:
    """Validate ``multi_lora_linear``'s arguments (errors name the argument)."""
    if not isinstance(x, Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = getattr(weight, "shape", type(weight).__name__)
        raise ValueError(f"weight must be a 2-D [out_features, in_features] tensor, got {shape}")
    if not all(hasattr(pool, a) for a in ("lora_A", "lora_B", "magnitude_scale", "dora_slots", "signature")):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    if not isinstance(batch, AdapterBatch):
        raise TypeError(f"batch must be an AdapterBatch (AdapterBatch.build(pool, ids)), got {type(batch).__name__}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({K})")
    if (pool.in_features, pool.out_features) != (K, N):
        raise ValueError(f"pool is for a [{pool.out_features}, {pool.in_features}] layer but weight is [{N}, {K}]")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias must be [out_features] = [{N}], got {getattr(bias, 'shape', bias)}")
    named = [("weight", weight), ("pool", pool.lora_A)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if batch.device != x.device:
        raise ValueError(f"batch is on {batch.device} but x is on {x.device}")
    rows = x.numel() // K if K else 0
    if batch.num_rows != rows:
        raise ValueError(f"batch has {batch.num_rows} rows but x has {rows} (x.shape[:-1] = {tuple(x.shape[:-1])})")
    if batch.signature != pool.signature:
        raise ValueError("batch was built for a different pool state (adapters were added or removed since, or it "
                         "belongs to another layer's pool): build it again for this pool")  # fmt: skip


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pool, batch: AdapterBatch) -> Tensor:
    """``y[t] = x[t] W0^T + bias + s_t (x[t] A_i[:b_t]^T) B_i[:, :b_t]^T`` with ``i`` the adapter of row ``t``.

    (DoRA adapters: ``g_i * (x W0^T + s (x A^T) B^T) + bias``; rows with id -1: ``x W0^T + bias``.)
    x: [..., K] (rows in the order the batch's ids describe: ``[M, K]`` decode, ``[batch, seq, K]`` prefill);
    weight: [N, K]; bias: [N] | None; pool: the layer's ``AdapterPool``; batch: ``AdapterBatch.build(pool, ids,
    ranks)`` (built once, reused by every layer whose pool has the same signature). Returns [..., N]. Inference only.
    """
    check_multi_lora_inputs(x, weight, bias, pool, batch)
    if not batch.has_adapter and x.is_cuda and not torch.compiler.is_compiling():
        # A graph captured now holds no adapter launch: the batch must refuse a later copy_ of adapter rows.
        batch.captured_without_adapters |= torch.cuda.is_current_stream_capturing()
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.ops.lowrank_kernels.multi_lora_fwd(
        x2d, weight, bias, pool.lora_A, pool.lora_B, pool.magnitude_scale, pool.dora_slots, batch.row_slot,
        batch.row_rank, batch.row_scale, batch.sorted_rows, batch.tiles, batch.block_m, batch.has_adapter,
    )  # fmt: skip
    return y.reshape(*lead, weight.shape[0])
