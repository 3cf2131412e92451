"""The multi-adapter gather matmul in plain PyTorch: the spec, the torch backend's primitives and the oracle.

One base layer ``W0 [N, K]`` (``bias [N]``), a pool of adapters ``i`` (``A_i [r_i, K]``, ``B_i [N, r_i]``, ``alpha_i``,
optionally a DoRA magnitude ``m_i [N]``), and a batch whose row ``t`` names its adapter ``i = id[t]`` (``-1``: none)
and an active rank ``b_t <= r_i`` (default ``r_i``)::

    LoRA row:    y[t] = x[t] W0^T + bias + s_t (x[t] A_i[:b_t]^T) B_i[:, :b_t]^T
    DoRA row:    y[t] = g_i * (x[t] W0^T + s_t (x[t] A_i^T) B_i^T) + bias,   g_i = m_i / ||W0 + s_i B_i A_i||_row
    no adapter:  y[t] = x[t] W0^T + bias

with ``s_t = alpha_i / b_t`` (rsLoRA: ``alpha_i / sqrt(b_t)``): LoRA's ``alpha / r`` at full rank, DyLoRA's Eq. 7 at a
truncated rank. DoRA's row norm is taken over K for each output row and is a constant at inference (computed once,
when the adapter is loaded), so a DoRA row costs a LoRA row plus a per-column scale; its rank is not truncated (``g_i``
belongs to the full-rank weight). In training ``g_i`` is recomputed from the current ``A_i, B_i, m_i`` at every
forward (the norm detached, ``pool_row_norm``). With adapter dropout a LoRA row uses ``drop(x[t])`` in its low-rank
term and a DoRA row takes peft's form ``x W0^T + bias + (g_i - 1) drop(x) W0^T + g_i s_t (drop(x) A_i^T) B_i^T``.

- ``multi_lora_linear_ref``: the spec, one row at a time, DoRA's norm from the materialised ``W0 + s B A``: the tests'
  oracle. Slow on purpose; nothing in it is shared with the backends.
- ``segment_shrink``, ``segment_expand``, ``segment_weight_grad``, ``pool_row_norm``: the primitives ``op.py``
  writes the forward and the backward over (the ``torch`` backend; ``triton.py`` and ``cuda.py`` implement the same).
- ``multi_lora_forward``: the serving math vectorised as a gather-bmm (every row gathers its adapter: the pools are
  read once per *row*), with the serving kernels' interface: the "gather-bmm" benchmark baseline.

Training (``op.py``'s backward). Write ``dy_g = dy * g_i`` (DoRA rows; ``dy`` elsewhere), ``xa_t = s_t drop(x_t)
A_i[:b_t]^T`` and ``dyb_t = s_t dy_g[t] B_i[:, :b_t]`` (both [M, R], zero past ``b_t``). Then, for every slot ``i``
over exactly its rows (zero for slots no row uses)::

    dA_i = sum_t dyb_t^T drop(x_t)        dB_i = sum_t dy_g[t]^T xa_t        dg_i = sum_t dy[t] * z[t]  (DoRA)
    dx   = dy_g W0 + dyb A_i                         (with dropout: dy W0 + drop'((dy_g - dy) W0 + dyb A_i))

and ``dm_i = dg_i / ||W0 + s_i B_i A_i||_row`` by autograd through ``g_i = m_i / norm`` (the norm detached). Rows
without adapter reach only ``dx = dy W0``. The dropout mask is ``lora_linear``'s: a hash of (seed, row, column)
over the batch's [M, K] input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lora.naive import cast, compute_dtype, dropout_mask


class AdapterWeights(NamedTuple):
    """One adapter as peft stores it: ``lora_A [r, K]`` (``lora_A.weight``), ``lora_B [N, r]``, ``alpha``, rsLoRA,
    and for DoRA the magnitude ``m [N]`` (peft's ``lora_magnitude_vector``)."""

    lora_A: Tensor
    lora_B: Tensor
    alpha: float
    rslora: bool = False
    magnitude: Tensor | None = None


def adapter_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA): the scale of an adapter used at ``rank``."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def multi_lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    adapter_ids: Sequence[int],
    adapters: Sequence[AdapterWeights | None],
    ranks: Sequence[int | None] | None = None,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """The per-row loop: the spec and the tests' oracle, differentiable by autograd. Computes in float64.

    x: [M, K]; weight: [N, K]; bias: [N] | None; adapter_ids: M ints in [-1, len(adapters)); adapters[i]: adapter i
    (None: an empty slot, which no row may name); ranks: M active ranks (None entries or None: the adapter's rank);
    dropout_mask: [M, K] (0 or 1/(1-p)) on the adapter input | None; DoRA rows then take peft's dropout form
    ``x W0^T + (g - 1) drop(x) W0^T + g s (drop(x) A^T) B^T + bias``. DoRA's norm is detached (a constant, as in
    training). Returns [M, N] float64.
    """
    f64 = torch.float64
    W0 = weight.to(f64)
    rows = []
    dora_g: dict[int, Tensor] = {}  # per adapter, computed on first use
    for t, i in enumerate(adapter_ids):
        xt = x[t].to(f64)
        xd = xt if dropout_mask is None else xt * dropout_mask[t].to(f64)
        y = W0 @ xt
        if i >= 0:
            ad = adapters[i]
            if ad is None:
                raise ValueError(f"row {t} names adapter {i}, an empty slot")
            A, B = ad.lora_A.to(f64), ad.lora_B.to(f64)
            r = A.shape[0]
            b = r if ranks is None or ranks[t] is None else int(ranks[t])
            low = adapter_scale(ad.alpha, b, ad.rslora) * (B[:, :b] @ (A[:b] @ xd))
            if ad.magnitude is None:
                y = y + low
            else:
                if i not in dora_g:
                    s = adapter_scale(ad.alpha, r, ad.rslora)
                    norm = torch.linalg.vector_norm(W0 + s * (B @ A), dim=1).detach()
                    dora_g[i] = ad.magnitude.to(f64) / norm
                g = dora_g[i]
                y = g * (y + low) if dropout_mask is None else y + (g - 1) * (W0 @ xd) + g * low
        rows.append(y if bias is None else y + bias.to(f64))
    if not rows:
        return torch.empty(0, weight.shape[0], device=x.device, dtype=f64)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# The primitives, in PyTorch: the torch backend. ``op.py`` writes the forward and the backward once over these;
# ``triton.py`` and ``cuda.py`` implement the same functions with the same arguments. Every per-row tensor is
# indexed by row (the batch's order), and accumulation is float32 (float64 for float64 inputs).
# ---------------------------------------------------------------------------------------------------------------


class BatchTensors(NamedTuple):
    """The device side of an ``AdapterBatch`` as the primitives take it (see ``batch.py`` for each field)."""

    row_slot: Tensor  # [M] int32, -1: no adapter
    row_rank: Tensor  # [M] int32, 0 without adapter
    row_scale: Tensor  # [M] float32
    sorted_rows: Tensor  # [M] int32, rows grouped by slot
    tiles: Tensor  # [T, 4] int32 (slot, start, end, max rank)
    slot_rows: Tensor  # [capacity, 2] int32: each slot's [start, end) in sorted_rows (start == end: unused)
    block_m: int


def row_mask(meta: BatchTensors, R: int) -> Tensor:
    """[M, R] bool: rank r is active on row t (r < b_t; no rank on a row without adapter)."""
    return torch.arange(R, device=meta.row_rank.device) < meta.row_rank.long().unsqueeze(-1)


def slot_segments(meta: BatchTensors) -> list[tuple[int, Tensor]]:
    """``(slot, rows)`` for every slot some row uses, its rows in ``sorted_rows`` order (read on the host)."""
    rows = meta.sorted_rows  # int32 indexes as well as int64 (no conversion a call)
    return [(slot, rows[start:end]) for slot, (start, end) in enumerate(meta.slot_rows.tolist()) if end > start]


def per_adapter(t: Tensor) -> bool:
    """One product per adapter (CPU: as fast as peft's loop over adapters) rather than a gather of each row's
    matrices: on a GPU the gather form keeps the layer free of host reads (CUDA graphs)."""
    return t.device.type == "cpu"


def per_adapter_product(v: Tensor, w: Tensor, meta: BatchTensors, compute: torch.dtype) -> Tensor:
    """[M, w.shape[1]]: ``v[t] w[i_t]^T`` by one product per adapter (zero on rows without adapter); a batch whose
    rows all use one adapter is one product with no gather or scatter (a decode step of one job)."""
    segments = slot_segments(meta)
    if len(segments) == 1 and segments[0][1].numel() == v.shape[0]:
        return F.linear(v, cast(w[segments[0][0]], compute))
    out = v.new_zeros(v.shape[0], w.shape[1])
    for slot, rows in segments:
        out[rows] = F.linear(v[rows], cast(w[slot], compute))
    return out


def segment_shrink(x: Tensor, a: Tensor, meta: BatchTensors, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] = s_t drop(x[t]) a[i_t, :b_t]^T in the compute dtype; zero past b_t and on rows without adapter.

    x: [M, K]; a: [n, R, K] (the pool's ``lora_A``, or ``lora_B.transpose(1, 2)`` for the backward's ``dy B``),
    any strides."""
    compute = compute_dtype(x.dtype)
    xc = cast(x, compute)
    if p_drop > 0.0:
        xc = xc * dropout_mask(seed, tuple(x.shape), p_drop, x.device).to(compute)
    if per_adapter(xc):
        t = per_adapter_product(xc, a, meta, compute) * cast(meta.row_scale, compute).unsqueeze(-1)
        if x.shape[0] and int(meta.row_rank.min()) == a.shape[1]:  # every row at full rank: nothing to mask
            return t
    else:
        idx = meta.row_slot.long().clamp_min(0)
        t = torch.bmm(cast(a[idx], compute), xc.unsqueeze(-1)).squeeze(-1) * cast(meta.row_scale, compute)[:, None]
    return torch.where(row_mask(meta, a.shape[1]), t, 0.0)


def dora_epilogue(y: Tensor, low: Tensor, g_rows: Tensor, is_dora: Tensor, bias: Tensor | None,
                  yd: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(y, z) of DoRA rows from the base ``y = x W0^T + bias`` and ``low = s xa B^T`` (compute dtype, [M, N]).

    Without dropout ``z = y - bias + low``, ``y = g z + bias``; with it (``yd = drop(x) W0^T``) ``z = yd + low``,
    ``y = y + (g - 1) yd + g low``. LoRA rows: ``y + low``, z = 0. g_rows: [M, N] (1 off DoRA rows), is_dora: [M, 1].
    """
    if yd is None:
        z = y - (0.0 if bias is None else bias.to(y.dtype)) + low
        y_dora = g_rows * z + (0.0 if bias is None else bias.to(y.dtype))
    else:
        z = yd + low
        y_dora = y + (g_rows - 1) * yd + g_rows * low
    return torch.where(is_dora, y_dora, y + low), torch.where(is_dora, z, 0.0)


def segment_expand(
    y: Tensor,
    t: Tensor,
    u: Tensor,
    meta: BatchTensors,
    *,
    p_drop: float = 0.0,
    seed: int = 0,
    dora: tuple[Tensor, Tensor] | None = None,
    bias: Tensor | None = None,
    yd: Tensor | None = None,
    save_z: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(y + low, z | None) in y's dtype, ``low[t] = t[t] u[i_t]^T`` ([M, N]; rows without adapter: 0).

    y: [M, N] (the base product, bias included); t: [M, R] from ``segment_shrink``; u: [n, N, R] (``lora_B``, or
    ``lora_A.transpose(1, 2)`` for the backward's dx). ``p_drop > 0``: ``low`` times the dropout mask of an [M, N]
    tensor (the backward's ``drop'``). ``dora = (g [n, N], dora_slots [n])``: DoRA slots take ``dora_epilogue``
    (``bias`` and the dropped base ``yd`` as there); ``z`` is returned when ``save_z``.
    """
    compute = compute_dtype(y.dtype)
    tc = cast(t, compute)
    if per_adapter(tc):
        low = per_adapter_product(tc, u, meta, compute)
    else:
        idx, has = meta.row_slot.long().clamp_min(0), (meta.row_slot >= 0).unsqueeze(-1)
        low = torch.where(has, torch.bmm(cast(u[idx], compute), tc.unsqueeze(-1)).squeeze(-1), 0.0)
    if p_drop > 0.0:
        low = low * dropout_mask(seed, tuple(low.shape), p_drop, y.device).to(compute)
    yc = cast(y, compute)
    if dora is None:
        return cast(low.add_(yc), y.dtype), (torch.zeros_like(y) if save_z else None)
    g, dora_slots = dora
    idx, has = meta.row_slot.long().clamp_min(0), (meta.row_slot >= 0).unsqueeze(-1)
    is_dora = has & (dora_slots.long()[idx] != 0).unsqueeze(-1)
    g_rows = torch.where(is_dora, cast(g[idx], compute), 1.0)
    out, z = dora_epilogue(yc, low, g_rows, is_dora, bias, None if yd is None else cast(yd, compute))
    return out.to(y.dtype), (z.to(y.dtype) if save_z else None)


def segment_weight_grad(u: Tensor, v: Tensor, meta: BatchTensors, capacity: int, *, p_drop: float = 0.0,
                        seed: int = 0) -> Tensor:  # fmt: skip
    """[capacity, P, Q] = per slot i, ``sum over the rows t of adapter i of u[t]^T drop(v[t])`` in the compute dtype.

    u: [M, P], v: [M, Q] (``p_drop``: v's dropout mask, an [M, Q] x's). Zero for slots no row uses. Each segment of
    ``sorted_rows`` is one product, rows in a fixed order: deterministic. Reads the segment table on the host (the
    reference path's one sync)."""
    compute = torch.promote_types(compute_dtype(u.dtype), compute_dtype(v.dtype))
    vc = cast(v, compute)
    if p_drop > 0.0:
        vc = vc * dropout_mask(seed, tuple(v.shape), p_drop, v.device).to(compute)
    uc = cast(u, compute)
    out = torch.zeros(capacity, u.shape[1], v.shape[1], device=u.device, dtype=compute)
    for slot, rows in slot_segments(meta):
        out[slot] = uc[rows].t() @ vc[rows]
    return out


def pool_row_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, slots: Sequence[int], scales: Sequence[float],
                  ranks: Sequence[int]) -> Tensor:  # fmt: skip
    """[len(slots), N] = ``||W0 + s_i B_i[:, :r_i] A_i[:r_i]||_row`` for the pool's adapters in ``slots``, detached.

    One pass over W0 for all of them: ``U = W0 [A_i]^T`` with the active A_i stacked ([N, sum r_i], one GEMM), then
    each adapter's factored norm (``ops.dora.naive.row_norm``'s identity); rows that cancel are computed directly."""
    from ..dora.naive import fix_cancelled_rows, weight_norm_sq

    compute = compute_dtype(weight.dtype)
    if not slots:
        return torch.empty(0, weight.shape[0], device=weight.device, dtype=compute)
    A_stack = torch.cat([lora_A[i, :r] for i, r in zip(slots, ranks, strict=True)]).to(compute)
    U = cast(weight, compute) @ A_stack.t()  # [N, sum r]: W0 read once
    w0_sq = weight_norm_sq(weight)
    out, start = [], 0
    for i, s, r in zip(slots, scales, ranks, strict=True):
        A, B = A_stack[start : start + r], cast(lora_B[i, :, :r], compute)
        quad = s * s * ((B @ (A @ A.t())) * B).sum(1)
        norm_sq = w0_sq + 2 * s * (B * U[:, start : start + r]).sum(1) + quad
        out.append(fix_cancelled_rows(norm_sq, w0_sq + quad, weight, lora_A[i], lora_B[i], scale=s, rank=r))
        start += r
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# The gather-bmm baseline with the serving kernels' interface (the "gather-bmm" benchmark, and the tests' check of
# the kernels' metadata).
# ---------------------------------------------------------------------------------------------------------------


def multi_lora_forward(
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
    sorted_rows: Tensor | None = None,
    tiles: Tensor | None = None,
    block_m: int = 0,
    *,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Gather-bmm over the pool, the kernels' interface. x: [M, K] -> y [M, N] in x's dtype.

    lora_A: [n, R, K], lora_B: [n, N, R] (the pool, zero past each adapter's rank); magnitude_scale: [n, N] float32
    (``g_i``; 1 for LoRA slots); dora_slots: [n] int32 (1: DoRA); row_slot: [M] int32 (-1: no adapter); row_rank:
    [M] int32 (``b_t``; 0 for rows without adapter); row_scale: [M] float32 (``s_t``). ``sorted_rows``, ``tiles``
    and ``block_m`` (the kernels' row grouping) are unused here: every row gathers its own adapter.
    ``compute_dtype``: default float32 (float64 for float64 x), the torch backend's accuracy; the gather-bmm benchmark
    baseline passes x's dtype, as a plain PyTorch implementation would run.
    """
    compute = compute_dtype or torch.promote_types(x.dtype, torch.float32)
    xc = cast(x, compute)
    slot = row_slot.long()
    has = slot >= 0
    idx = slot.clamp_min(0)
    R = lora_A.shape[1]
    # Each row gathers its adapter's [R, K] and [N, R] blocks: bytes read grow with rows, not with distinct adapters.
    xa = torch.bmm(cast(lora_A[idx], compute), xc.unsqueeze(-1)).squeeze(-1)  # [M, R]
    keep = torch.arange(R, device=x.device) < row_rank.long().unsqueeze(-1)  # rank 0 on rows without adapter
    xa = torch.where(keep, xa * cast(row_scale, compute).unsqueeze(-1), 0.0)
    low = torch.bmm(cast(lora_B[idx], compute), xa.unsqueeze(-1)).squeeze(-1)  # [M, N]
    z = F.linear(xc, cast(weight, compute)) + torch.where(has.unsqueeze(-1), low, 0.0)
    dora = (dora_slots.long()[idx] != 0) & has
    g = magnitude_scale[idx].to(torch.promote_types(compute, torch.float32))
    y = torch.where(dora.unsqueeze(-1), g * z, z)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


ADAPTER_MIXES = ("identical", "distinct", "uniform", "zipf", "none", "some-none")


def adapter_mix(kind: str, num_rows: int, num_adapters: int, seed: int = 0, zipf_a: float = 1.5) -> list[int]:
    """Adapter ids of ``num_rows`` requests over ``num_adapters`` slots: Punica's workload distributions.

    ``identical``: every row slot 0; ``distinct``: row t slot ``t % n``; ``uniform``: uniform over slots; ``zipf``:
    slot k with probability proportional to ``(k + 1)^-zipf_a`` (a few hot adapters, a long tail); ``none``: every
    row -1; ``some-none``: uniform, with about a third of the rows -1. Deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "identical":
        return [0] * num_rows
    if kind == "distinct":
        return [t % num_adapters for t in range(num_rows)]
    if kind == "uniform":
        return torch.randint(0, num_adapters, (num_rows,), generator=g).tolist()
    if kind == "zipf":
        p = torch.arange(1, num_adapters + 1, dtype=torch.float64) ** -zipf_a
        return torch.multinomial(p / p.sum(), num_rows, replacement=True, generator=g).tolist()
    if kind == "none":
        return [-1] * num_rows
    if kind == "some-none":
        ids = torch.randint(0, num_adapters, (num_rows,), generator=g)
        return torch.where(torch.rand(num_rows, generator=g) < 1 / 3, -1, ids).tolist()
    raise ValueError(f"kind must be one of {ADAPTER_MIXES}, got {kind!r}")
