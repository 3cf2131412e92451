"""DoRA as ``torch.library`` ops with autograd, and the functional entry points ``dora_linear`` / ``dora_weight_norm``.

Three custom ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through them:

- ``lowrank_kernels::dora_norm``: the detached row norm ``||W0 + s B A||_row`` ([N], fp32). No autograd: the
  norm is a constant by definition (DoRA paper §4.3); callers pass detached tensors.
- ``lowrank_kernels::dora_fwd`` / ``lowrank_kernels::dora_bwd``: the layer, tied by ``register_autograd``. The
  forward takes the norm as an input, so a caller that caches it (``DoRALinear`` while A, B and W0 are unchanged)
  pays LoRA plus a per-column scale.

Each op's body hands its inputs to the backend chosen by ``lowrank_kernels.backend`` (reference math in
``lowrank_kernels.reference.dora``, Triton kernels in ``lowrank_kernels.kernels.dora``, CUDA C++ in
``lowrank_kernels.kernels.cuda_ext``).

Saved for backward: x, W0, bias, A, B, m, the norm ([N]), ``xa`` ([M, R] fp32, as LoRA) and one [M, N] tensor:
the output y itself without dropout (z is recovered as ``(y - bias) / g``; autograd usually keeps y alive anyway
for the next layer), the forward's ``z = drop(x) W0^T + s xa B^T`` with dropout (y cannot give it back there).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..backend import cuda_impl, dispatch, requested_backend, triton_impl, use_backend
from ..reference import dora as reference
from ..reference.lora import dropout_mask
from .lora import _check_tensor, _seed_int, _xa_dtype, check_lora_inputs

_NORM_IMPLS = {
    "torch": reference.dora_weight_norm,
    "triton": triton_impl("dora", "dora_weight_norm"),
    "cuda": cuda_impl("cuda_ext", "dora_weight_norm"),
}
_FORWARD_IMPLS = {
    "torch": reference.dora_forward,
    "triton": triton_impl("dora", "dora_forward"),
    "cuda": cuda_impl("cuda_ext", "dora_forward"),
}
_BACKWARD_IMPLS = {
    "torch": reference.dora_backward,
    "triton": triton_impl("dora", "dora_backward"),
    "cuda": cuda_impl("cuda_ext", "dora_backward"),
}


def _norm_dtype(t: Tensor) -> torch.dtype:
    """The row norm's dtype: float32, float64 for float64 inputs (as ``xa``)."""
    return _xa_dtype(t)


@torch.library.custom_op("lowrank_kernels::dora_norm", mutates_args=())
def dora_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, weight_norm_sq: Tensor | None, scale: float, rank: int
) -> Tensor:
    """[N] = ||W0 + scale B[:, :rank] A[:rank]||_row in float32 (float64 for float64 inputs); no gradient.

    ``weight_norm_sq``: [N] ``||W0_n||^2`` in that dtype (a cache; None: computed in the same pass over W0).
    """
    args = (weight, lora_A, lora_B, weight_norm_sq, scale, rank)
    if weight.shape[0] == 0:
        return reference.dora_weight_norm(*args)
    return dispatch("dora_norm", _NORM_IMPLS, weight.device, *args)


@dora_norm.register_fake
def _(weight, lora_A, lora_B, weight_norm_sq, scale, rank):
    return weight.new_empty(weight.shape[0], dtype=_norm_dtype(weight))


@torch.library.custom_op("lowrank_kernels::dora_fwd", mutates_args=())
def dora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scale: float,
    rank: int,
    grad_rank_start: int,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: [M, K] -> (y [M, N], xa [M, R] float32, z [M, N] with dropout / empty [0] without).

    ``weight_norm`` [N] is the detached row norm (``dora_norm``); ``grad_rank_start`` is only read by the backward.
    ``seed`` is a CPU int64 scalar tensor (None without dropout): a tensor, so torch.compile traces its draw.
    """
    args = (x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, dropout_p, _seed_int(seed))
    if x.shape[0] == 0:  # nothing to launch; the reference handles empty batches
        return reference.dora_forward(*args)
    return dispatch("dora_fwd", _FORWARD_IMPLS, x.device, *args)


@dora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, grad_rank_start, dropout_p, seed):
    M, N = x.shape[0], weight.shape[0]
    z = x.new_empty(M, N) if dropout_p > 0.0 else x.new_empty(0)
    return x.new_empty(M, N), x.new_empty(M, lora_A.shape[0], dtype=_xa_dtype(x)), z


@torch.library.custom_op("lowrank_kernels::dora_bwd", mutates_args=())
def dora_bwd(
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
    seed: Tensor | None,
    needs_dx: bool,
    needs_dAB: bool,
    needs_dm: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB, dm), each an empty [0] tensor unless needed. ``saved``: y without dropout, z with.

    ``backend``: the backend the forward was asked to use ("" for the automatic choice); autograd runs a CUDA
    backward on its own thread, where the forward's ``use_backend`` context is not visible, so it travels here.
    """
    args = (grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, scale, rank,
            grad_rank_start, dropout_p, _seed_int(seed))  # fmt: skip
    needs = dict(needs_dx=needs_dx, needs_dAB=needs_dAB, needs_dm=needs_dm)
    if x.shape[0] == 0:
        return reference.dora_backward(*args, **needs)
    with use_backend(backend or None):
        return dispatch("dora_bwd", _BACKWARD_IMPLS, x.device, *args, **needs)


@dora_bwd.register_fake
def _(grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, scale, rank, grad_rank_start,
      dropout_p, seed, needs_dx, needs_dAB, needs_dm, backend):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dAB else x.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dAB else x.new_empty(0)
    dm = torch.empty_like(magnitude) if needs_dm else x.new_empty(0)
    return dx, dA, dB, dm


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, grad_rank_start, dropout_p, seed = inputs
    y, xa, z = output
    saved = z if dropout_p > 0.0 else y  # the one [M, N] tensor kept: see the module docstring
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, seed)
    ctx.args = (scale, rank, grad_rank_start, dropout_p, requested_backend() or "")
    ctx.mark_non_differentiable(xa, z)


def _backward(ctx, grad_out, _grad_xa, _grad_z):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, seed = ctx.saved_tensors
    scale, rank, grad_rank_start, dropout_p, backend = ctx.args
    needs = ctx.needs_input_grad  # x, weight, bias, lora_A, lora_B, magnitude, weight_norm, ...
    dx, dA, dB, dm = dora_bwd(grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, scale,
                              rank, grad_rank_start, dropout_p, seed, needs[0], needs[3] or needs[4], needs[5],
                              backend)  # fmt: skip
    # W0 and bias are frozen in a DoRA layer; should a caller train them anyway, their gradients are plain (the norm
    # is a constant for W0 too): dW0 = (g dy)^T x, or dy^T x + ((g - 1) dy)^T drop(x) with dropout.
    d_weight = None
    if needs[1]:
        dy = grad_out.float()
        g = magnitude.float() / weight_norm.float()
        if dropout_p == 0.0:
            d_weight = (dy * g).t() @ x.float()
        else:
            x_adapter = x.float() * dropout_mask(_seed_int(seed), tuple(x.shape), dropout_p, x.device)
            d_weight = dy.t() @ x.float() + (dy * (g - 1)).t() @ x_adapter
        d_weight = d_weight.to(weight.dtype)
    d_bias = grad_out.sum(0) if needs[2] else None
    return (dx if needs[0] else None, d_weight, d_bias, dA if needs[3] else None, dB if needs[4] else None,
            dm if needs[5] else None, None, None, None, None, None, None)  # fmt: skip


dora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional API: checks first, so no backend ever sees a shape, dtype, device or rank it could misread.
# ----------------------------------------------------------------------------------------------------------------


def _check_vector(name: str, t, n: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """``t`` must be a floating [n] tensor on ``device`` (and of ``dtype`` when given)."""
    _check_tensor(name, t, ndim=1)
    if t.shape[0] != n:
        raise ValueError(f"{name} must be [out_features] = [{n}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; all tensors must share a device")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; cast them to one dtype")


def _check_scalars(scale, dropout) -> None:
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def _seed_tensor(dropout: float, seed: int | None) -> Tensor | None:
    """The dropout seed as a CPU int64 scalar (drawn from torch's generator when None), None without dropout."""
    if dropout == 0.0:
        return None
    if seed is None:  # torch's CPU generator: repeatable under torch.manual_seed, no device sync
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return torch.tensor(int(seed), dtype=torch.int64)


def weight_norm_sq(weight: Tensor) -> Tensor:
    """``||W0_n||^2`` for every row: [N] float32 (float64 for float64), the cache ``dora_linear`` takes."""
    _check_tensor("weight", weight, ndim=2)
    return reference.weight_norm_sq(weight)


def dora_weight_norm(
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scale: float,
    rank: int | None = None,
    weight_norm_sq: Tensor | None = None,
) -> Tensor:
    """``||W0 + scale B[:, :rank] A[:rank]||_row``: [N] float32 (float64 for float64 inputs), detached.

    weight: [N, K]; lora_A: [R, K]; lora_B: [N, R]; weight_norm_sq: [N] cached ``||W0_n||^2`` | None.
    Never forms ``W0 + s B A``: the factored norm, one pass over W0 (reference.dora). Pass the result to
    ``dora_linear(..., weight_norm=...)`` while A, B and W0 are unchanged (inference, gradient accumulation).
    """
    _check_tensor("weight", weight, ndim=2)
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        _check_tensor(name, t, ndim=2)
        if t.device != weight.device:
            raise ValueError(
                f"{name} is on {t.device} but weight is on {weight.device}; all tensors must share a device"
            )
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}; cast them to one dtype")
    probe = weight.new_empty(0, weight.shape[1])  # check_lora_inputs checks shapes and rank against an x [0, K]
    b = check_lora_inputs(probe, weight, None, lora_A, lora_B, None, rank)
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if weight_norm_sq is not None:
        _check_vector("weight_norm_sq", weight_norm_sq, weight.shape[0], weight.device)
        weight_norm_sq = weight_norm_sq.detach().to(_norm_dtype(weight))
    return torch.ops.lowrank_kernels.dora_norm(weight.detach(), lora_A.detach(), lora_B.detach(), weight_norm_sq,
                                               float(scale), b)  # fmt: skip


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    *,
    scale: float,
    rank: int | None = None,
    dropout: float = 0.0,
    frozen: bool = False,
    seed: int | None = None,
    weight_norm_sq: Tensor | None = None,
    weight_norm: Tensor | None = None,
) -> Tensor:
    """DoRA, fused: ``g * (x W0^T + scale (x A[:b]^T) B[:, :b]^T) + bias`` with ``g = magnitude / ||W0 + s B A||_row``
    (the norm detached); with dropout peft's form ``x W0^T + bias + (g - 1) drop(x) W0^T + g s (drop(x) A^T) B^T``.

    x: [..., K]; weight: [N, K] (W0, frozen); bias: [N] | None; lora_A: [R, K]; lora_B: [N, R]; magnitude: [N]
    (peft's ``lora_magnitude_vector``); rank: active rank b in [1, R] (default R); dropout: probability on the
    adapter input (the ``(g - 1) drop(x) W0^T`` term sees it too, as in peft); seed: the dropout mask's seed
    (default: drawn from torch's generator); frozen: DyLoRA frozen mode (only rank b - 1 of A and B trains).
    weight_norm_sq: [N] cached ``||W0_n||^2`` | None; weight_norm: [N] the row norm at (A, B, scale, rank) from
    ``dora_weight_norm`` | None (computed here). Both are constants to autograd. Returns [..., N].
    """
    b = check_lora_inputs(x, weight, bias, lora_A, lora_B, None, rank)
    N = weight.shape[0]
    _check_vector("magnitude", magnitude, N, x.device, x.dtype)
    _check_scalars(scale, dropout)
    seed_t = _seed_tensor(dropout, seed)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scale=scale, rank=b, weight_norm_sq=weight_norm_sq)
    else:
        _check_vector("weight_norm", weight_norm, N, x.device)
        weight_norm = weight_norm.detach().to(_norm_dtype(x))
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    args = (float(scale), b, b - 1 if frozen else 0, float(dropout), seed_t)
    y, _, _ = torch.ops.lowrank_kernels.dora_fwd(x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm, *args)
    return y.reshape(*lead, N)
