"""Plain PyTorch reference for the low-rank adapter ops: the spec, the CPU backend and the test oracle.

LoRA / DyLoRA at active rank ``b`` (nn.Linear convention, DESIGN.md §3)::

    y = x W0^T + bias + s * ((drop(x) A[:b]^T) * v[:b]) B[:, :b]^T

with ``x [M, K]``, ``W0 [N, K]``, ``A [R, K]``, ``B [N, R]``, scalar scale ``s`` and an optional per-rank
scale vector ``v [R]`` (AdaLoRA's lambda; all ones for LoRA). Write ``xa = drop(x) A[:b]^T`` ([M, b]) and
``dyb = dy B[:, :b]`` ([M, b]). With W0 frozen the backward is::

    dx          = dy W0 + s * drop'((dyb * v) A[:b])        drop' applies the same mask as the forward
    dA[:b]      = s * (dyb * v)^T drop(x)
    dB[:, :b]   = s * dy^T (xa * v)
    dv[:b]      = s * sum_m xa * dyb

Rows of A / columns of B past ``b`` get zero gradient; in DyLoRA's frozen mode only rank ``b - 1`` does.

``lora_linear_ref`` is the differentiable formula (the oracle: tests take its autograd gradients in float64).
``lora_forward`` / ``lora_backward`` are the same math written out explicitly with the kernels' interface:
they are the ``torch`` backend, and tests check them against the oracle too.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    rank: int | None = None,
    rank_scale: Tensor | None = None,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """Unfused LoRA forward, differentiable by autograd. ``dropout_mask`` is ``drop(x) / x`` (0 or 1/(1-p)).

    x: [..., K], weight: [N, K], bias: [N] | None, lora_A: [R, K], lora_B: [N, R], rank_scale: [R] | None,
    dropout_mask: like x | None. Returns [..., N].
    """
    b = lora_A.shape[0] if rank is None else rank
    x_adapter = x if dropout_mask is None else x * dropout_mask
    xa = x_adapter @ lora_A[:b].t()
    if rank_scale is not None:
        xa = xa * rank_scale[:b]
    return torch.nn.functional.linear(x, weight, bias) + scale * (xa @ lora_B[:, :b].t())


_MASK32 = 0xFFFFFFFF


def _mul32(a: Tensor, c: int) -> Tensor:
    """(a * c) mod 2**32 for int64 ``a`` in [0, 2**32), split so no int64 product overflows."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str = "cpu") -> Tensor:
    """The dropout mask every backend applies: float32 ``shape`` = [M, K] of 0 or 1/(1-p).

    Element (m, k) keeps x iff ``u >= p``, ``u`` the top 24 bits of ``fmix32(fmix32(lo ^ key) ^ hi)`` / 2**24, where
    ``lo, hi`` are the 32-bit halves of ``m * K + k`` and ``key = fmix32(seed ^ 0x9E3779B9)`` (murmur3's finaliser).
    A pure function of (seed, position), so the backward rebuilds it; the Triton kernels compute it bit for bit.
    """
    M, K = shape
    flat = torch.arange(M * K, device=device, dtype=torch.int64)
    key = _fmix32(torch.tensor((seed & _MASK32) ^ 0x9E3779B9, device=device, dtype=torch.int64))
    bits = _fmix32(_fmix32((flat & _MASK32) ^ key) ^ (flat >> 32))
    uniform = (bits >> 8).to(torch.float32) * (1.0 / 16777216.0)
    one = torch.ones((), dtype=torch.float32, device=device)
    factor = one / (one - torch.tensor(p, dtype=torch.float32, device=device))  # float32, as in the kernels
    return torch.where(uniform >= torch.tensor(p, dtype=torch.float32), factor, 0.0).reshape(M, K)


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    rank_scale: Tensor | None,
    scale: float,
    rank: int,
    dropout_p: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Forward with the kernels' interface. x: [M, K] -> (y [M, N] in x's dtype, xa [M, R] float32 or float64).

    ``xa`` holds ``drop(x) A[:b]^T`` (unscaled, zero past ``b``): the backward needs it for dB and dv.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c = x.to(compute)
    x_adapter = x_c if dropout_p == 0.0 else x_c * dropout_mask(seed, tuple(x.shape), dropout_p, x.device)
    xa = torch.zeros(x.shape[0], lora_A.shape[0], device=x.device, dtype=compute)
    xa[:, :rank] = x_adapter @ lora_A[:rank].to(compute).t()
    t = xa[:, :rank] if rank_scale is None else xa[:, :rank] * rank_scale[:rank].to(compute)
    y = x_c @ weight.to(compute).t() + scale * (t @ lora_B[:, :rank].to(compute).t())
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), xa


def lora_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    rank_scale: Tensor | None,
    xa: Tensor,
    scale: float,
    rank: int,
    grad_rank_start: int,
    dropout_p: float,
    seed: int,
    needs_dx: bool = True,
    needs_dAB: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward with the kernels' interface. grad_out: [M, N], x: [M, K], xa: [M, R] from ``lora_forward``.

    Returns (dx [M, K], dA [R, K], dB [N, R], dv [R] | None) in the dtypes of x, A, B and v;
    dx (dA, dB) is an empty [0] tensor unless needs_dx (needs_dAB).
    """
    compute = torch.promote_types(grad_out.dtype, torch.float32)
    dy = grad_out.to(compute)
    A, B = lora_A[:rank].to(compute), lora_B[:, :rank].to(compute)
    xa_b = xa[:, :rank].to(compute)
    v = None if rank_scale is None else rank_scale[:rank].to(compute)
    mask = None if dropout_p == 0.0 else dropout_mask(seed, tuple(x.shape), dropout_p, x.device)

    dyb = dy @ B  # [M, b]
    dyb_v = dyb if v is None else dyb * v
    dx = x.new_empty(0)
    if needs_dx:
        dx_adapter = scale * (dyb_v @ A)
        if mask is not None:
            dx_adapter = dx_adapter * mask
        dx = (dy @ weight.to(compute) + dx_adapter).to(x.dtype)

    x_adapter = x.to(compute) if mask is None else x.to(compute) * mask
    keep = (torch.arange(rank, device=x.device) >= grad_rank_start).to(compute)  # [b]; frozen: only b - 1
    dA, dB = x.new_empty(0), x.new_empty(0)  # distinct tensors: custom-op outputs may not alias
    if needs_dAB:
        dA = torch.zeros(lora_A.shape, device=x.device, dtype=compute)
        dB = torch.zeros(lora_B.shape, device=x.device, dtype=compute)
        dA[:rank] = scale * (dyb_v.t() @ x_adapter) * keep[:, None]
        xa_v = xa_b if v is None else xa_b * v
        dB[:, :rank] = scale * (dy.t() @ xa_v) * keep[None, :]
        dA, dB = dA.to(lora_A.dtype), dB.to(lora_B.dtype)
    dv = None
    if rank_scale is not None:
        dv = torch.zeros(rank_scale.shape, device=x.device, dtype=compute)
        dv[:rank] = scale * (xa_b * dyb).sum(0) * keep
        dv = dv.to(rank_scale.dtype)
    return dx, dA, dB, dv
