"""The LoRA adapter term over a base product that is not ours: ``y_base + s * ((drop(x) A[:b]^T) * v[:b]) B[:, :b]^T``.

For a base layer whose product some other library computes (QLoRA: bitsandbytes' dequantising 4-bit matmul,
``modules/lora.py``'s ``LoRALinear4bit`` and ``modules/dora.py``'s ``DoRALinear4bit``), the base output ``y_base``
comes in and the adapter term is added to it on the package's fused primitives (``shrink`` with its dropout,
``lowrank_matmul``, ``weight_grad``: contracts in ``naive.py``), as ``op.py`` does for ``lora_linear``:

1. ``lora_delta`` checks every argument and calls the registered op (``run_registered``: eager calls skip the
   custom-op dispatch);
2. ``lowrank_kernels::lora_delta_fwd`` (``op.register_op``, a fake implementation, ``register_autograd``) picks a
   backend (``op.backend_for``, ``op.implementation``) and runs ``delta_forward`` below over the backend's
   primitives; the backward is LoRA's own ``lowrank_kernels::lora_bwd`` without a base weight
   (``op.lora_backward``).

Forward: ``xa = drop(x) A[:b]^T`` (the shrink, dropout fused), then one ``addmm`` onto ``y_base`` (the same
rank-b product as the Triton backend's cuBLAS strategy). Backward, with ``dyb = dy B[:, :b]``::

    d y_base    = dy                                   (unchanged: y_base enters as a sum)
    dx          = s * drop'((dyb * v) A[:b])           the low-rank GEMM over an empty (K = 0) base product,
                                                       its epilogue applying x's dropout mask
    dA[:b]      = s * (dyb * v)^T drop(x)              dropout fused into weight_grad's x
    dB[:, :b]   = s * dy^T (xa * v)
    dv[:b]      = s * sum_m xa * dyb

over ranks ``[grad_rank_start, b)`` for A, B and v (DyLoRA's frozen mode: only ``b - 1``), zero elsewhere.
``y_base=None`` returns the term alone (DoRA's 4-bit layer scales it by its per-column ``g`` before adding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import backend
from ..._checks import (
    check_dropout,
    check_like,
    check_lora_inputs,
    check_scale,
    check_tensor,
    once_per_signature,
    seed_int,
    seed_tensor,
)
from . import naive
from .op import (
    _lora_bwd,
    as_rows,
    backend_for,
    contiguous_vector,
    implementation,
    lora_bwd,
    register_autograd,
    register_op,
    run_registered,
)

# ---------------------------------------------------------------------------------------------------------------
# The orchestration: forward and backward, once, over a backend's primitives.
# ---------------------------------------------------------------------------------------------------------------


def scaled_rows(xa: Tensor, rank_scale: Tensor | None, scale: float, rank: int, dtype: torch.dtype) -> Tensor:
    """``scale * (xa * v)[:, :rank]`` in ``dtype``: the left factor of the rank-b addmm (as Triton's cuBLAS path)."""
    t = xa[:, :rank] * scale
    if rank_scale is not None:
        t = t * naive.cast(rank_scale[:rank], t.dtype)
    return naive.cast(t, dtype)


def delta_forward(impl, y_base, x, lora_A, lora_B, rank_scale, *, scale, rank, p_drop,
                  seed) -> tuple[Tensor, Tensor]:  # fmt: skip
    """x: [M, K], y_base: [M, N] | None -> (y [M, N] in x's dtype, xa [M, R] = drop(x) A[:rank]^T in the compute
    dtype, zero past rank). ``y = y_base + scale * (xa * v)[:, :rank] B[:, :rank]^T`` (without y_base: the term)."""
    xa = impl.shrink(x, lora_A, rank, p_drop=p_drop, seed=seed)
    left, up = scaled_rows(xa, rank_scale, scale, rank, x.dtype), lora_B[:, :rank].t()
    y = torch.mm(left, up) if y_base is None else torch.addmm(y_base, left, up)
    return y, xa


# ---------------------------------------------------------------------------------------------------------------
# Registration: ops (``op.register_op``) with fake implementations and autograd.
# ---------------------------------------------------------------------------------------------------------------


def _lora_delta_fwd(
    y_base: Tensor | None,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    rank_scale: Tensor | None,
    scale: float,
    rank: int,
    grad_rank_start: int,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x: [M, K], y_base: [M, N] | None -> (y [M, N], xa [M, R] float32, float64 for float64 x).

    ``grad_rank_start`` is the backward's; ``seed`` a CPU int64 scalar tensor (None without dropout).
    """
    rank_scale = contiguous_vector(rank_scale)
    impl = implementation(_fwd_backend(y_base, x, lora_A, lora_B, rank_scale))
    return delta_forward(impl, y_base, x, lora_A, lora_B, rank_scale, scale=scale, rank=rank, p_drop=dropout_p,
                         seed=seed_int(seed))  # fmt: skip


def _fwd_backend(y_base, x, lora_A, lora_B, rank_scale, *_) -> str:
    return backend_for("lora_delta_fwd", x, lora_B, lora_A, y_base, rank_scale)


def _fwd_fake(y_base, x, lora_A, lora_B, rank_scale, scale, rank, grad_rank_start, dropout_p, seed):
    xa_dtype = naive.compute_dtype(x.dtype)
    return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0], dtype=xa_dtype)


lora_delta_fwd = register_op("lora_delta_fwd", _lora_delta_fwd, _fwd_fake, _fwd_backend)


def _setup_context(ctx, inputs, output):
    y_base, x, lora_A, lora_B, rank_scale, scale, rank, grad_rank_start, dropout_p, seed = inputs
    ctx.save_for_backward(x, lora_A, lora_B, rank_scale, output[1], seed)
    ctx.args = (scale, rank, grad_rank_start, dropout_p, backend.requested_backend() or "")
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_xa):
    x, lora_A, lora_B, rank_scale, xa, seed = ctx.saved_tensors
    scale, rank, grad_rank_start, dropout_p, backend_name = ctx.args
    needs = ctx.needs_input_grad  # y_base, x, lora_A, lora_B, rank_scale, ...
    d_base = grad_out if needs[0] else None  # y_base enters as a plain sum
    if not any(needs[1:5]):
        return d_base, None, None, None, None, None, None, None, None, None
    # LoRA's backward without a base weight: dx of the adapter term alone.
    bwd = _lora_bwd if getattr(ctx, "eager", False) else lora_bwd  # traced: the registered op
    dx, dA, dB, dv = bwd(grad_out, x, None, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start, dropout_p,
                         seed, needs[1], needs[2] or needs[3] or needs[4], backend_name)  # fmt: skip
    return (d_base, dx if needs[1] else None, dA if needs[2] else None, dB if needs[3] else None,
            dv if needs[4] else None, None, None, None, None, None)  # fmt: skip


_EagerLoRADelta = register_autograd(lora_delta_fwd, _lora_delta_fwd, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Functional API: checks first, so no backend ever sees a shape, dtype, device or rank it could misread.
# ---------------------------------------------------------------------------------------------------------------


@once_per_signature
def check_lora_delta_inputs(y_base, x, lora_A, lora_B, rank_scale, rank) -> int:
    """``check_lora_inputs`` with no base weight (x: [..., K], lora_A: [R, K], lora_B: [N, R], rank_scale: [R] | None)
    and y_base: [..., N] with x's leading shape | None; returns the active rank (R when ``rank`` is None)."""
    for name, t, ndim in (("x", x, None), ("lora_A", lora_A, 2), ("lora_B", lora_B, 2)):
        check_tensor(name, t, ndim=ndim)
    (N, _), (_, K) = lora_B.shape, lora_A.shape
    if x.dim() >= 1 and x.shape[-1] != K:  # said here: check_lora_inputs would name the stand-in weight
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal lora_A's in_features ({K})")
    probe = x.new_empty(()).expand(N, K)  # the weight it checks against: no memory, x's dtype and device
    b = check_lora_inputs(x, probe, None, lora_A, lora_B, rank_scale, rank)
    if y_base is not None:
        check_tensor("y_base", y_base)
        expected = (*x.shape[:-1], N)
        if tuple(y_base.shape) != expected:
            raise ValueError(f"y_base must be [*x.shape[:-1], out_features] = {list(expected)} (x's leading shape, "
                             f"lora_B's out_features), got {list(y_base.shape)}")  # fmt: skip
        check_like("y_base", y_base, "x", x)
    return b


def lora_delta(
    y_base: Tensor | None,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scale: float,
    rank: int | None = None,
    rank_scale: Tensor | None = None,
    dropout: float = 0.0,
    frozen: bool = False,
    seed: int | None = None,
) -> Tensor:
    """``y_base + scale * ((drop(x) A[:rank]^T) * rank_scale[:rank]) B[:, :rank]^T`` on the fused primitives.

    y_base: [..., N], the base layer's output for x (its product is someone else's: bitsandbytes' 4-bit matmul),
    of x's dtype and device; None: the adapter term alone. x: [..., K]; lora_A: [R, K]; lora_B: [N, R];
    rank: active rank b in [1, R] (default R); rank_scale: [R] | None; dropout: on the adapter input only, the
    mask of ``lora_linear`` for the same ``seed`` (``op.dropout_mask``; default: drawn from torch's generator);
    frozen: DyLoRA frozen mode, only rank ``rank - 1`` of A and B (and rank_scale) gets gradient. Gradients reach x,
    lora_A, lora_B, rank_scale, and y_base (``dy``, unchanged). Returns [..., N]; any layout of any argument.
    """
    b = check_lora_delta_inputs(y_base, x, lora_A, lora_B, rank_scale, rank)
    scale, dropout = check_scale(scale), check_dropout(dropout)
    seed_t = seed_tensor(dropout, seed)
    base2d = None if y_base is None else as_rows(y_base)
    args = (base2d, as_rows(x), lora_A, lora_B, rank_scale, scale, b, b - 1 if frozen else 0, dropout, seed_t)
    y, _ = run_registered(lora_delta_fwd, _EagerLoRADelta, _lora_delta_fwd, args, (y_base, x, lora_A, lora_B,
                                                                                     rank_scale))  # fmt: skip
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], lora_B.shape[0])
