"""Plain PyTorch reference for DoRA: the spec, the CPU backend and the test oracle.

DoRA (weight-decomposed low-rank adaptation, DESIGN.md §3) at active rank ``b``, nn.Linear convention::

    g = m / ||W0 + s B[:, :b] A[:b]||_row                 [N], the norm over K of each output row, *detached*
    y = g * (x W0^T + s (x A[:b]^T) B[:, :b]^T) + bias                                    without dropout
    y = x W0^T + bias + (g - 1) * (drop(x) W0^T) + g * s (drop(x) A[:b]^T) B[:, :b]^T    with adapter dropout

exactly as peft computes it (``DoraLinearLayer.forward``; peft switches to the second form when its dropout is
active and the layer is training). ``m [N]`` is the trainable magnitude; the norm is a constant in backward (DoRA
paper, §4.3), so gradients flow to ``m`` through ``g`` and to x, A, B through the low-rank and base terms only.

The norm, factored so that no [N, K] tensor is formed (``U = W0 A[:b]^T`` [N, b], ``G = A[:b] A[:b]^T`` [b, b])::

    ||W0_n + s (B A)_n||^2 = ||W0_n||^2 + 2 s <B_n, U_n> + s^2 B_n G B_n^T

``||W0_n||^2`` does not change while W0 is frozen, so callers cache it (``weight_norm_sq``).

Backward. Write ``z = x W0^T + s xa B^T`` (``xa = x A[:b]^T``) without dropout and ``z = drop(x) W0^T + s xa B^T``
(``xa = drop(x) A[:b]^T``) with it: in both forms ``dy/dg = z`` per column. With ``dy_g = dy * g`` (columns)::

    dm        = sum_rows(dy * z) / ||.||
    dA[:b]    = s (dy_g B[:, :b])^T drop(x)          LoRA's dA and dB of the upstream gradient dy_g
    dB[:, :b] = s dy_g^T xa
    dx        = dy_g W0 + s (dy_g B[:, :b]) A[:b]                                         without dropout
    dx        = dy W0 + drop'((dy * (g - 1)) W0 + s (dy_g B[:, :b]) A[:b])                with dropout

``drop'`` applies the forward's mask (0 or 1/(1-p)). ``z`` is not saved: without dropout it is recovered from the
output, ``z = (y - bias) / g``, so ``dm = sum_rows(dy * (y - bias)) / m`` and the output (which autograd usually
keeps alive anyway, for the next layer) is the one [M, N] tensor saved. A magnitude entry exactly 0 leaves nothing
to recover in its column; its ``dm`` is returned as 0 (peft's own forward is NaN for a zero row norm, and a
trained magnitude does not sit at exactly 0). With dropout ``y - bias`` also holds ``(x - drop(x)) W0^T``, so the
forward returns ``z`` itself as the one saved [M, N] tensor instead of the output.

``dora_linear_ref`` is the differentiable oracle (the direct norm of ``W0 + s B A``, detached; tests take its
autograd gradients in float64). ``dora_weight_norm`` / ``dora_forward`` / ``dora_backward`` are the same math
written out with the kernels' interface: the ``torch`` backend, checked against the oracle too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lora import dropout_mask, lora_backward

_ROW_CHUNK = 1024  # rows per step in weight_norm_sq: a low-precision W0 is never upcast whole


def dora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scale: float,
    rank: int | None = None,
    dropout_mask: Tensor | None = None,
) -> Tensor:
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
    if dropout_mask is None:
        y = g * (torch.nn.functional.linear(x, weight) + low_rank)
    else:
        y = (
            torch.nn.functional.linear(x, weight)
            + (g - 1) * torch.nn.functional.linear(x_adapter, weight)
            + g * low_rank
        )
    return y if bias is None else y + bias


def weight_norm_sq(weight: Tensor) -> Tensor:
    """``||W0_n||^2`` for every row n: [N] float32 (float64 for a float64 weight), summed a row chunk at a time."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    return torch.cat([w.to(compute).square().sum(1) for w in weight.detach().split(_ROW_CHUNK)])


def dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    weight_norm_sq: Tensor | None,
    scale: float,
    rank: int,
    chunk_rows: int = 2048,
) -> Tensor:
    """``||W0 + s B[:, :rank] A[:rank]||_row`` by the factored formula: [N] float32 (float64 for float64 inputs).

    With ``U = W0 A^T [N, b]`` and ``G = A A^T [b, b]``: ``||W0_n||^2 + 2 s <B_n, U_n> + s^2 B_n G B_n^T``, never
    forming ``[N, K]``: W0 is read once, ``chunk_rows`` rows at a time in float32 (the only temporary), and the sum
    of squares is clamped at 0 against cancellation before the square root.
    weight: [N, K], lora_A: [R, K], lora_B: [N, R], weight_norm_sq: [N] (``||W0_n||^2``) | None (computed here).
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    A = lora_A[:rank].to(device=weight.device, dtype=compute)
    B = lora_B[:, :rank].to(device=weight.device, dtype=compute)
    G = A @ A.t()
    out = torch.empty(weight.shape[0], device=weight.device, dtype=compute)
    for start in range(0, weight.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        w, b = weight[rows].to(compute), B[rows]
        w0_sq = (w * w).sum(1) if weight_norm_sq is None else weight_norm_sq[rows].to(compute)
        sq = w0_sq + 2 * scale * (b * (w @ A.t())).sum(1) + scale * scale * ((b @ G) * b).sum(1)
        out[rows] = sq.clamp_min(0).sqrt()
    return out


def dora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scale: float,
    rank: int,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward with the kernels' interface. x: [M, K], weight_norm: [N] (detached) -> (y, xa, z).

    y [M, N] in x's dtype; xa [M, R] float32 (float64) = ``drop(x) A[:rank]^T``, zero past rank; z [M, N] in x's
    dtype = ``drop(x) W0^T + s xa B^T`` with dropout (what the backward needs for dm), an empty [0] tensor without.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c, w = x.to(compute), weight.to(compute)
    mask = None if dropout_p == 0.0 else dropout_mask(seed, tuple(x.shape), dropout_p, x.device)
    x_adapter = x_c if mask is None else x_c * mask
    xa = torch.zeros(x.shape[0], lora_A.shape[0], device=x.device, dtype=compute)
    xa[:, :rank] = x_adapter @ lora_A[:rank].to(compute).t()
    low_rank = scale * (xa[:, :rank] @ lora_B[:, :rank].to(compute).t())
    g = magnitude.to(compute) / weight_norm.to(compute)
    z = x.new_empty(0)
    if mask is None:
        y = g * (x_c @ w.t() + low_rank)
    else:
        dropped = x_adapter @ w.t()
        y = x_c @ w.t() + (g - 1) * dropped + g * low_rank
        z = (dropped + low_rank).to(x.dtype)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), xa, z


def dora_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    xa: Tensor,
    saved: Tensor,
    scale: float,
    rank: int,
    grad_rank_start: int,
    dropout_p: float,
    seed: int,
    needs_dx: bool = True,
    needs_dAB: bool = True,
    needs_dm: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward with the kernels' interface. grad_out: [M, N]; xa from ``dora_forward``; ``saved``: the forward's
    output y without dropout, its z with dropout.

    Returns (dx [M, K], dA [R, K], dB [N, R], dm [N]) in the dtypes of x, A, B and m; each is an empty [0] tensor
    unless needed. Rows of A / columns of B outside [grad_rank_start, rank) get zero gradient (DyLoRA frozen mode).
    """
    compute = torch.promote_types(grad_out.dtype, torch.float32)
    dy = grad_out.to(compute)
    g = magnitude.to(compute) / weight_norm.to(compute)
    dy_g = dy * g
    dx, dA, dB, dm = (x.new_empty(0) for _ in range(4))  # distinct tensors: custom-op outputs may not alias
    if needs_dx:
        w = weight.to(compute)
        low_rank = scale * ((dy_g @ lora_B[:, :rank].to(compute)) @ lora_A[:rank].to(compute))
        if dropout_p == 0.0:
            dx = dy_g @ w + low_rank
        else:
            mask = dropout_mask(seed, tuple(x.shape), dropout_p, x.device)
            dx = dy @ w + mask * ((dy * (g - 1)) @ w + low_rank)
        dx = dx.to(x.dtype)
    if needs_dAB:  # the LoRA gradients of the upstream gradient g * dy
        _, dA, dB, _ = lora_backward(dy_g, x, weight, lora_A, lora_B, None, xa, scale, rank, grad_rank_start,
                                     dropout_p, seed, needs_dx=False)  # fmt: skip
    if needs_dm:
        if dropout_p == 0.0:  # z = (y - bias) / g, so sum(dy z) / ||.|| = sum(dy (y - bias)) / m
            y_minus_bias = saved.to(compute) if bias is None else saved.to(compute) - bias.to(compute)
            m = magnitude.to(compute)
            total = (dy * y_minus_bias).sum(0)
            dm = torch.where(m != 0, total / m, torch.zeros_like(total))
        else:
            dm = (dy * saved.to(compute)).sum(0) / weight_norm.to(compute)
        dm = dm.to(magnitude.dtype)
    return dx, dA, dB, dm
