"""LoRA / DyLoRA in plain PyTorch: the spec, the CPU path (the ``torch`` backend) and the test oracle.

LoRA / DyLoRA at active rank ``b`` (nn.Linear convention)::

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
``shrink``, ``lowrank_matmul`` and ``weight_grad`` are the primitives ``op.py`` writes the forward and backward
over, in PyTorch: the ``torch`` backend; ``triton.py`` and ``cuda.py`` implement the same functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
                    rank: int | None = None, rank_scale: Tensor | None = None,
                    dropout_mask: Tensor | None = None) -> Tensor:  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------------------
# The primitives, in PyTorch: the torch backend. ``op.py`` writes the forward and backward once over these; the
# Triton (``triton.py``) and CUDA C++ (``cuda.py``) backends implement the same functions with the same arguments.
# Accumulation is float32 (float64 for float64 inputs: the oracle dtype stays float64 end to end).
# ---------------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the primitives accumulate in: float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; no call at all when it already is (a no-op ``.to`` still costs ~1 us per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _first(t: Tensor, rank: int) -> Tensor:
    """``t[:, :rank]``, without a slice when that is all of it (slicing costs ~1 us a call on the host)."""
    return t if t.shape[1] == rank else t[:, :rank]


def keep_factor(p: float) -> float:
    """1 / (1 - p) in float32 arithmetic: the value of a kept entry of every backend's mask."""
    one = torch.ones((), dtype=torch.float32)
    return (one / (one - torch.tensor(p, dtype=torch.float32))).item()


def shrink(x: Tensor, a: Tensor, rank: int, *, p_drop: float = 0.0, seed: int = 0) -> Tensor:
    """t [M, R] = drop(x) a[:rank]^T in the compute dtype, zero past ``rank``. x: [M, K], a: [R, K] (any strides)."""
    compute = compute_dtype(x.dtype)
    xc = cast(x, compute)
    if p_drop > 0.0:
        xc = xc * cast(dropout_mask(seed, tuple(x.shape), p_drop, x.device), compute)
    if rank == a.shape[0]:
        return F.linear(xc, cast(a, compute))
    t = torch.zeros(x.shape[0], a.shape[0], device=x.device, dtype=compute)
    t[:, :rank] = xc @ cast(a[:rank], compute).t()
    return t


def lowrank_matmul(x: Tensor, w: Tensor, bias: Tensor | None, t: Tensor, u: Tensor, v: Tensor | None, *, scale: float,
                   rank: int, p_drop: float = 0.0, seed: int = 0, epilogue_dropout: bool = False,
                   col_scale: tuple[Tensor, Tensor] | None = None, dropped_x: Tensor | None = None,
                   save_z: bool = False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """The GEMM with a low-rank epilogue, in x's dtype: ``(y [M, N], z [M, N] | None)``.

    ``low = scale * (t * v)[:, :rank] u[:, :rank]^T`` (times the dropout mask at (m, n) with ``epilogue_dropout``:
    the backward's ``dx``), x: [M, K], w: [N, K], t: [M, >=rank], u: [N, >=rank], v: [>=rank] | None.

    - plain: ``z = x w^T + low``, ``y = z + bias``;
    - ``col_scale = (num, den)`` (DoRA's ``g = m / ||W'||``, [N]): ``y = g * z + bias``;
    - ``dropped_x`` (DoRA's dropout form, with col_scale): x with its dropped entries zeroed (unscaled), and
      ``z = drop(x) w^T + low``, ``y = (x - drop(x)) w^T + g * z + bias``.

    ``z`` (what DoRA's magnitude gradient needs) is returned when ``save_z``.
    """
    compute = compute_dtype(x.dtype)
    xc, wc = cast(x, compute), cast(w, compute)
    tv = cast(_first(t, rank), compute)
    if v is not None:
        tv = tv * cast(v[:rank], compute)
    up = cast(_first(u, rank), compute).t()
    rest = None
    bias_in_gemm = bias is not None and col_scale is None and dropped_x is None and not save_z  # plain LoRA
    if bias_in_gemm:
        z = F.linear(xc, wc, cast(bias, compute))
    elif dropped_x is None:
        z = F.linear(xc, wc)
    else:
        z = F.linear(cast(dropped_x, compute), wc) * keep_factor(p_drop)
        rest = F.linear(xc, wc) - z
    if epilogue_dropout:
        z += scale * (tv @ up) * cast(dropout_mask(seed, (x.shape[0], u.shape[0]), p_drop, x.device), compute)
    else:
        z.addmm_(tv, up, alpha=scale)
    if col_scale is None:
        y = z.clone() if save_z else z
    else:
        y = z * (cast(col_scale[0], compute) / cast(col_scale[1], compute))
    if rest is not None:
        y += rest
    if bias is not None and not bias_in_gemm:
        y += cast(bias, compute)
    return cast(y, x.dtype), (cast(z, x.dtype) if save_z else None)


def weight_grad(t: Tensor, x: Tensor, v: Tensor | None, *, scale: float, rank_start: int, rank: int,
                p_drop: float = 0.0, seed: int = 0) -> Tensor:  # fmt: skip
    """[rank - rank_start, K] = scale * (t * v)[:, rank_start:rank]^T drop(x) in the compute dtype (dA, and dB^T).

    t: [M, >=rank], x: [M, K], v: [>=rank] | None."""
    compute = compute_dtype(x.dtype)
    xc = cast(x, compute)
    if p_drop > 0.0:
        xc = xc * cast(dropout_mask(seed, tuple(x.shape), p_drop, x.device), compute)
    tv = cast(t[:, rank_start:rank], compute)
    if v is not None:
        tv = tv * cast(v[rank_start:rank], compute)
    return scale * (tv.t() @ xc)
