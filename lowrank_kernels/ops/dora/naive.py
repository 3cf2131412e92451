"""DoRA in plain PyTorch: the spec, the CPU path (the ``torch`` backend) and the test oracle.

DoRA (weight-decomposed low-rank adaptation) at active rank ``b``, nn.Linear convention::

    g = m / ||W0 + s B[:, :b] A[:b]||_row                 [N], the norm over K of each output row, *detached*
    y = g * (x W0^T + s (x A[:b]^T) B[:, :b]^T) + bias                                    without dropout
    y = x W0^T + bias + (g - 1) * (drop(x) W0^T) + g * s (drop(x) A[:b]^T) B[:, :b]^T    with adapter dropout

exactly as peft computes it (``DoraLinearLayer.forward``; peft switches to the second form when its dropout is
active and the layer is training). ``m [N]`` is the trainable magnitude; the norm is a constant in backward (DoRA
paper, §4.3), so gradients flow to ``m`` through ``g`` and to x, A, B through the low-rank and base terms only.

The norm, factored so that no [N, K] tensor is formed (``U = W0 A[:b]^T`` [N, b], ``G = A[:b] A[:b]^T`` [b, b])::

    ||W0_n + s (B A)_n||^2 = ||W0_n||^2 + 2 s <B_n, U_n> + s^2 B_n G B_n^T

``||W0_n||^2`` does not change while W0 is frozen, so callers cache it (``weight_norm_sq``). The sum cancels
when a row of ``W0 + s B A`` is small beside ``W0`` and ``s B A`` (float32 keeps ~7 digits of
``||W0_n||^2 + s^2 ||(BA)_n||^2``, not of the difference): rows whose factored result falls below
``CANCELLATION_FRACTION`` of that sum are computed directly, ``||W0_n + s B_n A||``, a few rows at a time.

Backward. Write ``z = x W0^T + s xa B^T`` (``xa = x A[:b]^T``) without dropout and ``z = drop(x) W0^T + s xa B^T``
(``xa = drop(x) A[:b]^T``) with it: in both forms ``dy/dg = z`` per column. With ``dy_g = dy * g`` (columns)::

    dm        = sum_rows(dy * z) / ||.||
    dA[:b]    = s (dy_g B[:, :b])^T drop(x)          LoRA's dA and dB of the upstream gradient dy_g
    dB[:, :b] = s dy_g^T xa
    dx        = dy_g W0 + s (dy_g B[:, :b]) A[:b]                                         without dropout
    dx        = dy W0 + drop'((dy * (g - 1)) W0 + s (dy_g B[:, :b]) A[:b])                with dropout

``drop'`` applies the forward's mask (0 or 1/(1-p)). The forward stores ``z`` (the one [M, N] tensor saved for
the backward; not the output, so in-place ops on the output stay legal, as for ``nn.Linear``): ``dm`` is then exact
for any magnitude, ``m = 0`` included, and as precise as ``z`` itself.

``dora_linear_ref`` is the differentiable oracle (the direct norm of ``W0 + s B A``, detached; tests take its
autograd gradients in float64). ``row_norm``, ``dropout_shrink``, ``dora_dx`` and ``col_dot`` are DoRA's primitives
beside LoRA's (``shrink``, ``lowrank_matmul``, ``weight_grad``); ``op.py`` writes the forward and backward over them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..lora.naive import cast, compute_dtype, dropout_mask, lowrank_matmul, shrink, weight_grad

__all__ = ["lowrank_matmul", "shrink", "weight_grad"]  # the LoRA primitives DoRA runs on, beside its own

_ROW_CHUNK = 1024  # rows per step in weight_norm_sq: a low-precision W0 is never upcast whole


def dora_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                    scale: float, rank: int | None = None, dropout_mask: Tensor | None = None) -> Tensor:  # fmt: skip
    """Unfused DoRA forward (peft's formula), differentiable by autograd; the row norm is detached.

    x: [..., K], weight: [N, K], bias: [N] | None, lora_A: [R, K], lora_B: [N, R], magnitude: [N],
    dropout_mask: like x, 0 or 1/(1-p) | None (None: the no-dropout form). Returns [..., N].
    """
    b = lora_A.shape[0] if rank is None else rank
    A, B = lora_A[:b], lora_B[:, :b]
    weight_norm = torch.linalg.vector_norm(weight + scale * (B @ A), dim=1).detach()
    g = magnitude / weight_norm
    x_adapter = x if dropout_mask is None else x * dropout_mask
    low_rank = scale * ((x_adapter @ A.t()) @ B.t())
    base = torch.nn.functional.linear(x, weight)
    if dropout_mask is None:
        y = g * (base + low_rank)
    else:
        y = base + (g - 1) * torch.nn.functional.linear(x_adapter, weight) + g * low_rank
    return y if bias is None else y + bias


def weight_norm_sq(weight: Tensor) -> Tensor:
    """``||W0_n||^2`` for every row n: [N] float32 (float64 for a float64 weight), summed a row chunk at a time."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    return torch.cat([cast(w, compute).square().sum(1) for w in weight.detach().split(_ROW_CHUNK)])


# The factored row norm gives way to the direct one where it fell below this fraction of ||W0_n||^2 + s^2 ||(BA)_n||^2:
# there float32 rounding of the two large terms (relative ~1e-6 at K = 8192) could exceed ~1e-5 of the result.
CANCELLATION_FRACTION = 1.0 / 16.0


def direct_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scale: float, rank: int, rows: Tensor) -> Tensor:
    """``||W0_n + s B_n A||`` for the rows ``rows`` (an index tensor), ``_ROW_CHUNK`` rows at a time in the compute
    dtype: never more than ``[_ROW_CHUNK, K]`` of ``W0 + s B A`` exists."""
    compute = compute_dtype(weight.dtype)
    A = cast(lora_A[:rank], compute)
    out = torch.empty(rows.shape[0], device=weight.device, dtype=compute)
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        idx = rows[start : start + _ROW_CHUNK]
        w = weight.index_select(0, idx).to(compute) + scale * (lora_B[:, :rank].index_select(0, idx).to(compute) @ A)
        out[start : start + _ROW_CHUNK] = torch.linalg.vector_norm(w, dim=1)
    return out


def fix_cancelled_rows(norm_sq: Tensor, reference_sq: Tensor, weight, lora_A, lora_B, *, scale, rank) -> Tensor:
    """sqrt of the factored ``norm_sq`` [N], with the rows where it cancelled (below ``CANCELLATION_FRACTION`` of
    ``reference_sq``) computed directly instead. One host sync (the row list): the reference and CUDA C++ paths."""
    norm = norm_sq.clamp_min(0).sqrt()
    rows = torch.nonzero(norm_sq < CANCELLATION_FRACTION * reference_sq).flatten()
    if rows.numel():
        norm[rows] = direct_row_norm(weight, lora_A, lora_B, scale=scale, rank=rank, rows=rows).to(norm.dtype)
    return norm


def row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, weight_norm_sq: Tensor | None, *, scale: float,
             rank: int, chunk_rows: int = 2048) -> Tensor:  # fmt: skip
    """``||W0 + s B[:, :rank] A[:rank]||_row`` [N] in the compute dtype, factored (one pass over W0, ``chunk_rows``
    rows at a time upcast, the only temporary), cancelled rows direct. weight_norm_sq: [N] cache | None."""
    compute = compute_dtype(weight.dtype)
    A = cast(lora_A[:rank], compute)
    B = cast(lora_B[:, :rank], compute)
    G = A @ A.t()
    norm_sq = torch.empty(weight.shape[0], device=weight.device, dtype=compute)
    reference_sq = torch.empty_like(norm_sq)
    for start in range(0, weight.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        w, b = cast(weight[rows], compute), B[rows]
        w0_sq = (w * w).sum(1) if weight_norm_sq is None else cast(weight_norm_sq[rows], compute)
        quad = scale * scale * ((b @ G) * b).sum(1)
        norm_sq[rows] = w0_sq + 2 * scale * (b * (w @ A.t())).sum(1) + quad
        reference_sq[rows] = w0_sq + quad
    return fix_cancelled_rows(norm_sq, reference_sq, weight, lora_A, lora_B, scale=scale, rank=rank)


def dropout_shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float, seed: int) -> tuple[Tensor, Tensor]:
    """(xd [M, K] = x with its dropped entries zeroed, unscaled, in x's dtype; t = drop(x) a[:rank]^T, 0 past rank)."""
    keep = dropout_mask(seed, tuple(x.shape), p_drop, x.device) != 0
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)), shrink(
        x, a, rank, p_drop=p_drop, seed=seed
    )


def dora_dx(dy: Tensor, weight: Tensor, g: Tensor, t: Tensor, lora_A: Tensor, *, scale: float, rank: int,
            p_drop: float = 0.0, seed: int = 0) -> Tensor:  # fmt: skip
    """DoRA's input gradient in dy's dtype: ``(dy * g) W0 + s t[:, :rank] A[:rank]``, with dropout
    ``dy W0 + drop'((dy * (g - 1)) W0 + s t A)``. dy: [M, N], g: [N], t = (dy * g) B: [M, >=rank]."""
    compute = compute_dtype(dy.dtype)
    dyc, w, gc = cast(dy, compute), cast(weight, compute), cast(g, compute)
    low = scale * (cast(t[:, :rank], compute) @ cast(lora_A[:rank], compute))
    if p_drop == 0.0:
        dx = (dyc * gc) @ w + low
    else:
        mask = dropout_mask(seed, (dy.shape[0], weight.shape[1]), p_drop, dy.device).to(compute)
        dx = dyc @ w + mask * ((dyc * (gc - 1)) @ w + low)
    return dx.to(dy.dtype)


def col_dot(p: Tensor, q: Tensor) -> Tensor:
    """[N] = sum over rows of p * q, in the compute dtype (DoRA's magnitude gradient: ``sum_rows(dy * z)``)."""
    compute = compute_dtype(p.dtype)
    return (cast(p, compute) * cast(q, compute)).sum(0)
