"""Plain PyTorch reference for mixed-adapter batched inference (DESIGN.md §3, multi-adapter gather matmul).

One base layer ``W0 [N, K]`` (``bias [N]``), a pool of adapters ``i`` (``A_i [r_i, K]``, ``B_i [N, r_i]``, ``alpha_i``,
optionally a DoRA magnitude ``m_i [N]``), and a batch whose row ``t`` names its adapter ``i = id[t]`` (``-1``: none)
and an active rank ``b_t <= r_i`` (default ``r_i``)::

    LoRA row:    y[t] = x[t] W0^T + bias + s_t (x[t] A_i[:b_t]^T) B_i[:, :b_t]^T
    DoRA row:    y[t] = g_i * (x[t] W0^T + s_t (x[t] A_i^T) B_i^T) + bias,   g_i = m_i / ||W0 + s_i B_i A_i||_row
    no adapter:  y[t] = x[t] W0^T + bias

with ``s_t = alpha_i / b_t`` (rsLoRA: ``alpha_i / sqrt(b_t)``): LoRA's ``alpha / r`` at full rank, DyLoRA's Eq. 7 at a
truncated rank. DoRA's row norm is taken over K for each output row and is a constant at inference (computed once,
when the adapter is loaded), so a DoRA row costs a LoRA row plus a per-column scale; its rank is not truncated (``g_i``
belongs to the full-rank weight).

- ``multi_lora_linear_ref``: the spec, one row at a time, DoRA's norm from the materialised ``W0 + s B A``: the tests'
  oracle. Slow on purpose; nothing in it is shared with the backends.
- ``multi_lora_forward``: the same math vectorised as a gather-bmm (every row gathers its adapter: the pools are read
  once per *row*): the ``torch`` backend, with the kernels' interface, and the "gather-bmm" benchmark baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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
) -> Tensor:
    """The per-row loop: the spec and the tests' oracle. Computes in float64 on the inputs' device.

    x: [M, K]; weight: [N, K]; bias: [N] | None; adapter_ids: M ints in [-1, len(adapters)); adapters[i]: adapter i
    (None: an empty slot, which no row may name); ranks: M active ranks (None entries or None: the adapter's rank).
    Returns [M, N] float64.
    """
    f64 = torch.float64
    W0 = weight.to(f64)
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=f64)
    dora_g: dict[int, Tensor] = {}  # per adapter, computed on first use
    for t, i in enumerate(adapter_ids):
        xt = x[t].to(f64)
        y = W0 @ xt
        if i >= 0:
            ad = adapters[i]
            if ad is None:
                raise ValueError(f"row {t} names adapter {i}, an empty slot")
            A, B = ad.lora_A.to(f64), ad.lora_B.to(f64)
            r = A.shape[0]
            b = r if ranks is None or ranks[t] is None else int(ranks[t])
            y = y + adapter_scale(ad.alpha, b, ad.rslora) * (B[:, :b] @ (A[:b] @ xt))
            if ad.magnitude is not None:
                if i not in dora_g:
                    s = adapter_scale(ad.alpha, r, ad.rslora)
                    dora_g[i] = ad.magnitude.to(f64) / torch.linalg.vector_norm(W0 + s * (B @ A), dim=1)
                y = y * dora_g[i]
        out[t] = y if bias is None else y + bias.to(f64)
    return out


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
    xc = x.to(compute)
    slot = row_slot.long()
    has = slot >= 0
    idx = slot.clamp_min(0)
    R = lora_A.shape[1]
    # Each row gathers its adapter's [R, K] and [N, R] blocks: bytes read grow with rows, not with distinct adapters.
    xa = torch.bmm(lora_A[idx].to(compute), xc.unsqueeze(-1)).squeeze(-1)  # [M, R]
    keep = torch.arange(R, device=x.device) < row_rank.long().unsqueeze(-1)  # rank 0 on rows without adapter
    xa = torch.where(keep, xa * row_scale.to(compute).unsqueeze(-1), 0.0)
    low = torch.bmm(lora_B[idx].to(compute), xa.unsqueeze(-1)).squeeze(-1)  # [M, N]
    z = F.linear(xc, weight.to(compute)) + torch.where(has.unsqueeze(-1), low, 0.0)
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
