"""The multi-adapter gather matmul as ``torch.library`` ops: serving and training many adapters in one batch.

Follow a call top to bottom, as for LoRA (``ops/lora/op.py``):

1. ``multi_lora_linear`` checks its arguments against the pool and the batch (``AdapterBatch``, validated once per
   batch when it was built) and calls the registered op; the pool is duck-typed (``modules/pool.py``'s
   ``AdapterPool``: ``lora_A``, ``lora_B``, ``magnitude_scale``, ``dora_slots``, ``signature``), so the ops never
   import a module;
2. ``lowrank_kernels::multi_lora_fwd`` / ``multi_lora_bwd`` (``triton_op`` s with fake implementations, tied by
   ``register_autograd``, as ``ops/lora/op.py``'s ``register_op``) pick a backend and run
3. ``multi_lora_forward`` / ``multi_lora_backward`` below: the one orchestration, over the backend's primitives
   ``segment_shrink``, ``segment_expand`` and ``segment_weight_grad`` (``naive.py``: PyTorch, the spec and the CPU
   path; ``triton.py``: segmented kernels; ``cuda.py``: the csrc extension). The math: ``naive.py``.

DoRA's ``g_i`` enters as a tensor ``magnitude_scale [n, N]``: the cached serving value, or for a trainable pool
``m_i / ||W0 + s_i B_i A_i||_row`` recomputed from the current parameters (``multi_lora_norm``, detached), so the op
returns ``dg`` and autograd carries it to ``m``. The per-layer path is host arithmetic on facts fixed when the batch
was built: no ``.item()`` on a device tensor, no host copy, so serving runs inside a CUDA graph.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import backend
from ..._checks import FLOAT_DTYPES, check_dropout, once_per_signature, seed_int, seed_tensor
from ..lora.naive import keep_factor
from ..lora.op import as_rows, contiguous_vector, primitives, register_autograd, register_op, run_registered
from . import naive
from .batch import AdapterBatch
from .naive import BatchTensors


def implementation(name: str) -> ModuleType:
    """The module holding this op's primitives on backend ``name``."""
    return primitives(__package__, name)


# ----------------------------------------------------------------------------------------------------------------
# The orchestration: forward and backward, once, over a backend's primitives.
# ----------------------------------------------------------------------------------------------------------------


def dropped_base(x: Tensor, weight: Tensor, p_drop: float, seed: int) -> Tensor:
    """``drop(x) W0^T`` (DoRA's dropout form): x with its dropped entries zeroed (exact in any dtype) through the
    base GEMM, then the keep factor."""
    keep = naive.dropout_mask(seed, tuple(x.shape), p_drop, x.device) != 0
    return F.linear(torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), weight) * keep_factor(p_drop)


def multi_lora_forward(impl, x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, meta: BatchTensors, *,
                       has_dora, p_drop, seed, save_z) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """x: [M, K] -> (y [M, N] in x's dtype, xa [M, R] compute dtype, z [M, N] | None).

    The base GEMM (cuBLAS on every device backend), ``xa = s_t drop(x) A_i^T`` by ``segment_shrink``, and the
    low-rank term added by ``segment_expand`` (DoRA slots: ``g_i`` and, with dropout, peft's form over
    ``drop(x) W0^T``). ``z`` (the sum before ``g``, what ``dg`` needs) only when ``save_z``."""
    y = F.linear(x, weight, bias)
    xa = impl.segment_shrink(x, lora_A, meta, p_drop=p_drop, seed=seed)
    if not has_dora:
        y, _ = impl.segment_expand(y, xa, lora_B, meta)
        return y, xa, None
    yd = dropped_base(x, weight, p_drop, seed) if p_drop > 0.0 else None
    y, z = impl.segment_expand(y, xa, lora_B, meta, dora=(magnitude_scale, dora_slots), bias=bias, yd=yd,
                               save_z=save_z)  # fmt: skip
    return y, xa, z


def dora_rows(dy: Tensor, magnitude_scale: Tensor, dora_slots: Tensor, meta: BatchTensors) -> Tensor:
    """``dy * g_i`` on DoRA rows, dy elsewhere, in dy's dtype ([M, N])."""
    compute = naive.compute_dtype(dy.dtype)
    idx = meta.row_slot.long().clamp_min(0)
    is_dora = ((meta.row_slot >= 0) & (dora_slots.long()[idx] != 0)).unsqueeze(-1)
    return torch.where(is_dora, dy.to(compute) * magnitude_scale[idx].to(compute), dy.to(compute)).to(dy.dtype)


def multi_lora_backward(impl, dy, x, weight, lora_A, lora_B, magnitude_scale, dora_slots, xa, z, meta: BatchTensors,
                        *, has_dora, p_drop, seed, needs_dx, needs_dAB, needs_dg):  # fmt: skip
    """(dx [M, K], dA [n, R, K], dB [n, N, R], dg [n, N]), each an empty [0] tensor unless needed.

    ``g`` enters the shrink of dy through ``B_i * g_i`` (pool-shaped), the dx GEMM through ``dy_g`` and dB as a
    per-slot column scale; every weight gradient is a ``segment_weight_grad`` over each adapter's own rows."""
    compute = naive.compute_dtype(dy.dtype)
    capacity = lora_A.shape[0]
    dx, dA, dB, dg = (x.new_empty(0) for _ in range(4))  # distinct tensors: custom-op outputs may not alias
    g = magnitude_scale.to(compute)
    B_g = (lora_B.to(compute) * g[:, :, None]).to(lora_B.dtype) if has_dora else lora_B
    dyb = impl.segment_shrink(dy, B_g.transpose(1, 2), meta) if (needs_dx or needs_dAB) else None
    if needs_dx:
        dy_g = dora_rows(dy, magnitude_scale, dora_slots, meta) if has_dora else dy
        if p_drop == 0.0:
            base = F.linear(dy_g, weight.t())
        else:
            base = F.linear(dy, weight.t())
            if has_dora:  # drop'((dy_g - dy) W0): DoRA's (g - 1) drop(x) W0^T term
                mask = naive.dropout_mask(seed, tuple(x.shape), p_drop, x.device).to(compute)
                base = (base.to(compute) + mask * F.linear(dy_g - dy, weight.t()).to(compute)).to(dy.dtype)
        dx, _ = impl.segment_expand(base, dyb, lora_A.transpose(1, 2), meta, p_drop=p_drop, seed=seed)
    if needs_dAB:
        dA = impl.segment_weight_grad(dyb, x, meta, capacity, p_drop=p_drop, seed=seed).to(lora_A.dtype)
        dB = impl.segment_weight_grad(dy, xa, meta, capacity)
        if has_dora:
            dB = dB * g[:, :, None]
        dB = dB.to(lora_B.dtype)
    if needs_dg:
        ones = dy.new_ones(dy.shape[0], 1)
        dz = (dy.to(compute) * z.to(compute)).to(dy.dtype) if z.numel() else dy.new_zeros(dy.shape)
        dg = impl.segment_weight_grad(dz, ones, meta, capacity)[:, :, 0]
        dg = torch.where(dora_slots[:, None] != 0, dg, 0.0).to(magnitude_scale.dtype)
    return dx, dA, dB, dg


def _backend_for(op: str, x: Tensor, *tensors: Tensor | None) -> str:
    return backend.choose(op, x.device, (x, *tensors))


# ----------------------------------------------------------------------------------------------------------------
# Registration: custom ops with fake implementations and autograd.
# ----------------------------------------------------------------------------------------------------------------


# An opaque custom op on every backend: torch ops alone (one cuBLAS GEMM), with a data-dependent gather of the rows
# that cancel, which a traced graph cannot hold.
@torch.library.custom_op("lowrank_kernels::multi_lora_norm", mutates_args=())
def multi_lora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, slots: list[int], scales: list[float],
                    ranks: list[int]) -> Tensor:  # fmt: skip
    """[len(slots), N] DoRA row norms of the pool's adapters in ``slots`` (``naive.pool_row_norm``), no gradient.

    One GEMM over W0 for all of them on every backend (cuBLAS on a GPU: the stacked ``W0 [A_i]^T``)."""
    return naive.pool_row_norm(weight, lora_A, lora_B, slots, scales, ranks)


@multi_lora_norm.register_fake
def _(weight, lora_A, lora_B, slots, scales, ranks):
    return weight.new_empty(len(slots), weight.shape[0], dtype=naive.compute_dtype(weight.dtype))


def _multi_lora_fwd(
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
    slot_rows: Tensor,
    block_m: int,
    has_adapter: bool,
    has_dora: bool,
    dropout_p: float,
    seed: Tensor | None,
    save_z: bool,
    needs_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: [M, K] -> (y [M, N], xa [M, R] compute dtype (empty [0] unless needs_backward), z [M, N] if save_z else
    empty [0]).

    ``needs_backward`` False (serving): a backend's ``serving_forward`` may run the layer in fewer launches, and
    nothing is kept for a backward.

    The pool's tensors, then the batch's (``AdapterBatch``), see ``naive.py``. ``has_adapter`` False (every row -1):
    the bare ``F.linear`` and no adapter launch (in a CUDA-graph capture too); xa is then all zero.
    ``seed``: a CPU int64 scalar tensor (None without dropout), so torch.compile traces its draw.
    """
    M, R = x.shape[0], lora_A.shape[1]
    if M == 0 or not has_adapter:
        xa = x.new_zeros(M if needs_backward else 0, R if needs_backward else 0, dtype=naive.compute_dtype(x.dtype))
        return F.linear(x, weight, bias), xa, x.new_zeros(M, weight.shape[0]) if save_z else x.new_empty(0)
    bias = contiguous_vector(bias)  # the kernels read 1-D vectors contiguous
    meta = BatchTensors(row_slot, row_rank, row_scale, sorted_rows, tiles, slot_rows, block_m)
    impl = implementation(_fwd_backend(x, weight, bias, lora_A, lora_B))
    serving = getattr(impl, "serving_forward", None)
    if serving is not None and not needs_backward and not save_z and dropout_p == 0.0:
        y = serving(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, meta)
        return y, x.new_empty(0, 0, dtype=naive.compute_dtype(x.dtype)), x.new_empty(0)
    y, xa, z = multi_lora_forward(impl, x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, meta,
                                  has_dora=has_dora, p_drop=dropout_p, seed=seed_int(seed), save_z=save_z)  # fmt: skip
    if save_z and z is None:
        z = x.new_zeros(M, weight.shape[0])
    if not needs_backward:
        xa = x.new_empty(0, 0, dtype=xa.dtype)
    return y, xa, x.new_empty(0) if z is None else z


def _fwd_backend(x, weight, bias, lora_A, lora_B, *_) -> str:
    return _backend_for("multi_lora_fwd", x, weight, bias, lora_A, lora_B)


def _fwd_fake(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, row_slot, row_rank, row_scale,
              sorted_rows, tiles, slot_rows, block_m, has_adapter, has_dora, dropout_p, seed, save_z,
              needs_backward):  # fmt: skip
    M, N = x.shape[0], weight.shape[0]
    xa_shape = (M, lora_A.shape[1]) if needs_backward else (0, 0)
    xa = x.new_empty(*xa_shape, dtype=naive.compute_dtype(x.dtype))
    return x.new_empty(M, N), xa, x.new_empty(M, N) if save_z else x.new_empty(0)


multi_lora_fwd = register_op("multi_lora_fwd", _multi_lora_fwd, _fwd_fake, _fwd_backend)


def _multi_lora_bwd(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude_scale: Tensor,
    dora_slots: Tensor,
    xa: Tensor,
    z: Tensor,
    row_slot: Tensor,
    row_rank: Tensor,
    row_scale: Tensor,
    sorted_rows: Tensor,
    tiles: Tensor,
    slot_rows: Tensor,
    block_m: int,
    has_adapter: bool,
    has_dora: bool,
    dropout_p: float,
    seed: Tensor | None,
    needs_dx: bool,
    needs_dAB: bool,
    needs_dg: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K], dA [n, R, K], dB [n, N, R], dg [n, N]), each an empty [0] tensor unless needed.

    ``backend_name``: the backend the forward was asked to use ("" for the automatic choice); autograd runs a CUDA
    backward on its own thread, where the forward's ``use_backend`` context is not visible, so it travels here.
    """
    if x.shape[0] == 0 or not has_adapter:  # the base layer alone: only dx, and zero weight gradients
        dx = F.linear(grad_out, weight.t()) if needs_dx else x.new_empty(0)
        dA = torch.zeros_like(lora_A) if needs_dAB else x.new_empty(0)
        dB = torch.zeros_like(lora_B) if needs_dAB else x.new_empty(0)
        dg = torch.zeros_like(magnitude_scale) if needs_dg else x.new_empty(0)
        return dx, dA, dB, dg
    meta = BatchTensors(row_slot, row_rank, row_scale, sorted_rows, tiles, slot_rows, block_m)
    impl = implementation(_bwd_backend(grad_out, x, weight, lora_A, lora_B, backend_name))
    return multi_lora_backward(impl, grad_out, x, weight, lora_A, lora_B, magnitude_scale, dora_slots, xa, z, meta,
                               has_dora=has_dora, p_drop=dropout_p, seed=seed_int(seed), needs_dx=needs_dx,
                               needs_dAB=needs_dAB, needs_dg=needs_dg)  # fmt: skip


def _bwd_backend(grad_out, x, weight, lora_A, lora_B, *args) -> str:
    with backend.use_backend(args[-1] or None):  # backend_name
        return _backend_for("multi_lora_bwd", x, weight, grad_out, lora_A, lora_B)


def _bwd_fake(grad_out, x, weight, lora_A, lora_B, magnitude_scale, dora_slots, xa, z, row_slot, row_rank, row_scale,
              sorted_rows, tiles, slot_rows, block_m, has_adapter, has_dora, dropout_p, seed, needs_dx, needs_dAB,
              needs_dg, backend_name):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dAB else x.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dAB else x.new_empty(0)
    dg = torch.empty_like(magnitude_scale) if needs_dg else x.new_empty(0)
    return dx, dA, dB, dg


multi_lora_bwd = register_op("multi_lora_bwd", _multi_lora_bwd, _bwd_fake, _bwd_backend)


_BATCH_INPUTS = slice(7, 16)  # row_slot .. has_dora in multi_lora_fwd's inputs


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots = inputs[:7]
    row_slot, row_rank, row_scale, sorted_rows, tiles, slot_rows, block_m, has_adapter, has_dora = inputs[_BATCH_INPUTS]
    dropout_p, seed = inputs[16:18]
    _, xa, z = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude_scale, dora_slots, xa, z, row_slot, row_rank,
                          row_scale, sorted_rows, tiles, slot_rows, seed)  # fmt: skip
    ctx.args = (block_m, has_adapter, has_dora, dropout_p, backend.requested_backend() or "")
    ctx.mark_non_differentiable(xa, z)


def _backward(ctx, grad_out, _grad_xa, _grad_z):
    x, weight, lora_A, lora_B, g, dora_slots, xa, z, *batch_tensors, seed = ctx.saved_tensors
    block_m, has_adapter, has_dora, dropout_p, backend_name = ctx.args
    needs = ctx.needs_input_grad  # x, weight, bias, lora_A, lora_B, magnitude_scale, ...
    if needs[5] and has_dora and z.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError("multi_lora_fwd was called with save_z=False, so the DoRA magnitudes have no gradient")
    bwd = _multi_lora_bwd if getattr(ctx, "eager", False) else multi_lora_bwd  # traced: the registered op
    dx, dA, dB, dg = bwd(grad_out, x, weight, lora_A, lora_B, g, dora_slots, xa, z, *batch_tensors,
                                    block_m, has_adapter, has_dora, dropout_p, seed, needs[0], needs[3] or needs[4],
                                    needs[5], backend_name)  # fmt: skip
    if needs[1] or needs[2]:
        raise RuntimeError("multi_lora_linear trains the adapters of a frozen base layer: weight and bias must not "
                           "require grad")  # fmt: skip
    return (dx if needs[0] else None, None, None, dA if needs[3] else None, dB if needs[4] else None,
            dg if needs[5] else None, *([None] * 14))  # fmt: skip


_EagerMultiLoRA = register_autograd(multi_lora_fwd, _multi_lora_fwd, _backward, _setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional API: host-side checks of shapes, dtypes, devices and the batch/pool match; nothing here syncs.
# ----------------------------------------------------------------------------------------------------------------


def check_multi_lora_inputs(x, weight, bias, pool, batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate ``multi_lora_linear``'s arguments (errors name the argument); returns the pool's tensors the op reads,
    ``(lora_A, lora_B, magnitude_scale, dora_slots)`` (read once: a module attribute costs ~0.6 us a read)."""
    if not isinstance(batch, AdapterBatch):
        raise TypeError(f"batch must be an AdapterBatch (AdapterBatch.build(pool, ids)), got {type(batch).__name__}")
    try:  # every attribute the op reads (an AdapterPool's: modules sit above the ops, so no isinstance)
        lora_A, lora_B, magnitude_scale, dora_slots = pool.lora_A, pool.lora_B, pool.magnitude_scale, pool.dora_slots
        in_features, out_features, signature = pool.in_features, pool.out_features, pool.signature
    except AttributeError:
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}") from None
    check_multi_lora_tensors(x, weight, bias, lora_A, lora_B, magnitude_scale, in_features, out_features,
                             batch.device, batch.num_rows)  # fmt: skip
    if batch.signature != signature:
        raise ValueError("batch was built for a different pool state (adapters were added or removed since, or it "
                         "belongs to another layer's pool): build it again for this pool")  # fmt: skip
    return lora_A, lora_B, magnitude_scale, dora_slots


@once_per_signature
def check_multi_lora_tensors(x, weight, bias, lora_A, lora_B, magnitude_scale, in_features, out_features,
                             batch_device, batch_rows) -> None:  # fmt: skip
    """The tensors of ``check_multi_lora_inputs``, with the pool's and the batch's sizes and device."""
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = getattr(weight, "shape", type(weight).__name__)
        raise ValueError(f"weight must be a 2-D [out_features, in_features] tensor, got {shape}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({K})")
    if (in_features, out_features) != (K, N):
        raise ValueError(f"pool is for a [{out_features}, {in_features}] layer but weight is [{N}, {K}]")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias must be [out_features] = [{N}], got {getattr(bias, 'shape', bias)}")
    named = [("weight", weight), ("pool", lora_A)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if batch_device != x.device:
        raise ValueError(f"batch is on {batch_device} but x is on {x.device}")
    rows = x.numel() // K if K else 0
    if batch_rows != rows:
        raise ValueError(f"batch has {batch_rows} rows but x has {rows} (x.shape[:-1] = {tuple(x.shape[:-1])})")
    for name, t in (("pool.lora_B", lora_B), ("pool.magnitude_scale", magnitude_scale)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, pool, batch: AdapterBatch, *,
                      dropout: float = 0.0, seed: int | None = None) -> Tensor:  # fmt: skip
    """``y[t] = x[t] W0^T + bias + s_t (drop(x[t]) A_i[:b_t]^T) B_i[:, :b_t]^T`` with ``i`` the adapter of row ``t``.

    (DoRA adapters: ``g_i * (x W0^T + s (x A^T) B^T) + bias``, with dropout peft's form; rows with id -1:
    ``x W0^T + bias``.) x: [..., K] (rows in the order the batch's ids describe: ``[M, K]`` decode or tokens,
    ``[batch, seq, K]`` prefill); weight: [N, K] (frozen); bias: [N] | None; pool: the layer's ``AdapterPool``;
    batch: ``AdapterBatch.build(pool, ids, ranks)`` (built once, reused by every layer whose pool has the same
    signature). dropout: probability on the adapter input (``lora_linear``'s mask over the batch's [M, K] rows);
    seed: its seed (default drawn from torch's generator). Returns [..., N]. Differentiable in x and in the pool's
    ``lora_A``, ``lora_B`` and ``magnitude_scale`` (a trainable pool's parameters reach them).
    """
    lora_A, lora_B, g, dora_slots = check_multi_lora_inputs(x, weight, bias, pool, batch)
    dropout = check_dropout(dropout)
    seed_t = seed_tensor(dropout, seed)
    batch.note_launch(x)
    differentiable = (x, lora_A, lora_B, g)
    needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    save_z = batch.has_dora and needs_backward and g.requires_grad
    args = (as_rows(x), weight, bias, lora_A, lora_B, g, dora_slots, batch.row_slot, batch.row_rank,
            batch.row_scale, batch.sorted_rows, batch.tiles, batch.slot_rows, batch.block_m, batch.has_adapter,
            batch.has_dora, dropout, seed_t, save_z, needs_backward)  # fmt: skip
    y, _, _ = run_registered(multi_lora_fwd, _EagerMultiLoRA, _multi_lora_fwd, args, differentiable)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def multi_lora_norm_of(weight: Tensor, lora_A: Tensor, lora_B: Tensor, slots, scales, ranks) -> Tensor:
    """[len(slots), N] DoRA row norms ``||W0 + s_i B_i A_i||_row`` of the pool's adapters in ``slots`` (detached)."""
    return torch.ops.lowrank_kernels.multi_lora_norm(weight.detach(), lora_A.detach(), lora_B.detach(),
                                                     [int(s) for s in slots], [float(s) for s in scales],
                                                     [int(r) for r in ranks])  # fmt: skip
