"""DoRA: ``y = g * (x W0^T + s (x A[:b]^T) B[:, :b]^T) + bias``, ``g = m / ||W0 + s B A||_row`` (detached), as
``torch.library`` ops; with adapter dropout peft's form ``x W0^T + bias + (g - 1) drop(x) W0^T + g s drop(x) A^T B^T``.

Follow a call top to bottom, as for LoRA (``ops/lora/op.py``):

1. ``dora_linear`` checks every argument and, unless the caller passes it, computes the row norm
   (``dora_weight_norm`` -> ``lowrank_kernels::dora_norm``, no autograd: the norm is a constant by definition);
2. ``lowrank_kernels::dora_fwd`` / ``dora_bwd`` pick a backend and run
3. ``dora_forward`` / ``dora_backward`` below, the one orchestration, over LoRA's primitives (``shrink``,
   ``lowrank_matmul``, ``weight_grad``) and DoRA's own (``row_norm``, ``dropout_shrink``, ``dora_dx``,
   ``col_dot``) in ``naive.py`` / ``triton.py`` / ``cuda.py``. The math and its derivation: ``naive.py``.

Saved for the backward: x, W0, A, B, m, the norm ([N]), ``xa`` ([M, R], as LoRA) and ``z`` ([M, N], the sum before
``g``), never the output: in-place ops on the output stay legal, and ``dm = sum_rows(dy * z) / norm`` is exact for
every magnitude (``m = 0`` included).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ... import backend
from ..._checks import (
    check_dropout,
    check_like,
    check_lora_inputs,
    check_scale,
    check_tensor,
    check_vector,
    once_per_signature,
    seed_int,
    seed_tensor,
)
from ..lora.naive import cast
from ..lora.op import (
    as_rows,
    backend_for,
    contiguous_vector,
    lowrank_forward,
    primitives,
    register_autograd,
    register_op,
    run_registered,
)
from . import naive


def implementation(name: str) -> ModuleType:
    """The module holding DoRA's primitives (and LoRA's) on backend ``name``."""
    return primitives(__package__, name)


# ---------------------------------------------------------------------------------------------------------------
# The orchestration: forward and backward, once, over a backend's primitives.
# ---------------------------------------------------------------------------------------------------------------


def dora_forward(impl, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, *, scale, rank, p_drop, seed,
                 save_z) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """x: [M, K] -> (y [M, N], xa [M, R], z [M, N] | None). With dropout each W0 tile is read once for x and
    drop(x) (the GEMM's second accumulator on ``xd``, x with its dropped entries zeroed); peft runs two GEMMs."""
    col_scale = (magnitude, weight_norm)
    if p_drop == 0.0:
        return lowrank_forward(impl, x, weight, bias, lora_A, lora_B, None, scale=scale, rank=rank, p_drop=0.0,
                               seed=seed, col_scale=col_scale, save_z=save_z)  # fmt: skip
    xd, xa = impl.dropout_shrink(x, lora_A, rank, p_drop=p_drop, seed=seed)
    y, z = impl.lowrank_matmul(x, weight, bias, xa, lora_B, None, scale=scale, rank=rank, p_drop=p_drop, seed=seed,
                               col_scale=col_scale, dropped_x=xd, save_z=save_z)  # fmt: skip
    return y, xa, z


def dora_backward(impl, dy, x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, *, scale, rank,
                  grad_rank_start, p_drop, seed, needs_dx, needs_dAB, needs_dm):  # fmt: skip
    """(dx [M, K], dA [R, K], dB [N, R], dm [N]), each an empty [0] tensor unless needed.

    LoRA's gradients of the upstream ``dy * g`` (g enters the shrink through ``B * g`` and dx through dy's tiles:
    nothing [M, N] is formed), ``dx`` by ``dora_dx`` (the dropout form mixes ``dy`` and ``dy * (g - 1)``), and
    ``dm = sum_rows(dy * z) / norm``.
    """
    compute = naive.compute_dtype(dy.dtype)
    g = magnitude.to(compute) / weight_norm.to(compute)  # [N]
    lo = grad_rank_start
    dx, dA, dB, dm = (x.new_empty(0) for _ in range(4))  # distinct tensors: custom-op outputs may not alias
    if needs_dx or needs_dAB:
        dyb = impl.shrink(dy, (lora_B.to(compute) * g[:, None]).to(dy.dtype).t(), rank)  # [M, R] = (dy * g) B
    if needs_dx:
        dx = impl.dora_dx(dy, weight, g, dyb, lora_A, scale=scale, rank=rank, p_drop=p_drop, seed=seed)
    if needs_dAB:
        dA = lora_A.new_zeros(lora_A.shape)
        dB = lora_B.new_zeros(lora_B.shape)
        if lo < rank:
            grad = dict(scale=scale, rank_start=lo, rank=rank)
            dA[lo:rank] = impl.weight_grad(dyb, x, None, p_drop=p_drop, seed=seed, **grad)
            dB[:, lo:rank] = impl.weight_grad(xa, dy, None, **grad).t() * g[:, None]
    if needs_dm:
        dm = (impl.col_dot(dy, z) / weight_norm.to(compute)).to(magnitude.dtype)
    return dx, dA, dB, dm


# ---------------------------------------------------------------------------------------------------------------
# Registration: ops (``register_op``: triton_op or opaque custom op) with fake implementations and autograd.
# ---------------------------------------------------------------------------------------------------------------


def _dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, weight_norm_sq: Tensor | None, scale: float,
               rank: int) -> Tensor:  # fmt: skip
    """[N] = ||W0 + scale B[:, :rank] A[:rank]||_row in float32 (float64 for float64 inputs); no gradient.

    ``weight_norm_sq``: [N] ``||W0_n||^2`` in that dtype (a cache; None: computed in the same pass over W0).
    """
    weight_norm_sq = contiguous_vector(weight_norm_sq)
    impl = implementation(_dora_norm_backend(weight, lora_A, lora_B))
    return impl.row_norm(weight, lora_A, lora_B, weight_norm_sq, scale=scale, rank=rank)


def _dora_norm_backend(weight, lora_A, lora_B, *_) -> str:
    return backend_for("dora_norm", weight, weight, lora_A, lora_B)


def _dora_norm_fake(weight, lora_A, lora_B, weight_norm_sq, scale, rank):
    return weight.new_empty(weight.shape[0], dtype=naive.compute_dtype(weight.dtype))


dora_norm = register_op("dora_norm", _dora_norm, _dora_norm_fake, _dora_norm_backend)


def _dora_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
              weight_norm: Tensor, scale: float, rank: int, grad_rank_start: int, dropout_p: float, seed: Tensor | None,
              save_z: bool) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """x: [M, K] -> (y [M, N], xa [M, R] float32, z [M, N] if save_z else empty [0]).

    ``weight_norm`` [N] is the detached row norm (``dora_norm``); ``grad_rank_start`` is only read by the backward.
    ``seed`` is a CPU int64 scalar tensor (None without dropout): a tensor, so torch.compile traces its draw.
    """
    bias, magnitude, weight_norm = map(contiguous_vector, (bias, magnitude, weight_norm))
    impl = implementation(_dora_fwd_backend(x, weight, bias, lora_A, lora_B, magnitude))
    y, xa, z = dora_forward(impl, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale=scale, rank=rank,
                            p_drop=dropout_p, seed=seed_int(seed), save_z=save_z)  # fmt: skip
    return y, xa, x.new_empty(0) if z is None else z


def _dora_fwd_backend(x, weight, bias, lora_A, lora_B, magnitude, *_) -> str:
    return backend_for("dora_fwd", x, weight, bias, lora_A, lora_B, magnitude)


def _dora_fwd_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, grad_rank_start, dropout_p,
                   seed, save_z):  # fmt: skip
    M, N = x.shape[0], weight.shape[0]
    xa = x.new_empty(M, lora_A.shape[0], dtype=naive.compute_dtype(x.dtype))
    return x.new_empty(M, N), xa, x.new_empty(M, N) if save_z else x.new_empty(0)


dora_fwd = register_op("dora_fwd", _dora_fwd, _dora_fwd_fake, _dora_fwd_backend)


def _dora_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
              weight_norm: Tensor, xa: Tensor, z: Tensor, scale: float, rank: int, grad_rank_start: int,
              dropout_p: float, seed: Tensor | None, needs_dx: bool, needs_dAB: bool, needs_dm: bool,
              backend_name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dA, dB, dm), each an empty [0] tensor unless needed; ``z`` is the forward's (empty unless needs_dm).

    ``backend_name``: the backend the forward was asked to use ("" for the automatic choice); autograd runs a CUDA
    backward on its own thread, where the forward's ``use_backend`` context is not visible, so it travels here.
    """
    magnitude, weight_norm = contiguous_vector(magnitude), contiguous_vector(weight_norm)
    impl = implementation(_dora_bwd_backend(grad_out, x, weight, lora_A, lora_B, magnitude, backend_name))
    return dora_backward(impl, grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, scale=scale,
                         rank=rank, grad_rank_start=grad_rank_start, p_drop=dropout_p, seed=seed_int(seed),
                         needs_dx=needs_dx, needs_dAB=needs_dAB, needs_dm=needs_dm)  # fmt: skip


def _dora_bwd_backend(grad_out, x, weight, lora_A, lora_B, magnitude, *args) -> str:
    with backend.use_backend(args[-1] or None):  # backend_name
        return backend_for("dora_bwd", x, weight, grad_out, lora_A, lora_B, magnitude)


def _dora_bwd_fake(grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, scale, rank, grad_rank_start,
                   dropout_p, seed, needs_dx, needs_dAB, needs_dm, backend_name):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dAB else x.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dAB else x.new_empty(0)
    dm = torch.empty_like(magnitude) if needs_dm else x.new_empty(0)
    return dx, dA, dB, dm


dora_bwd = register_op("dora_bwd", _dora_bwd, _dora_bwd_fake, _dora_bwd_backend)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, grad_rank_start, dropout_p, seed, _ = inputs
    _, xa, z = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, seed)
    ctx.args = (scale, rank, grad_rank_start, dropout_p, backend.requested_backend() or "")
    ctx.mark_non_differentiable(xa, z)


def _backward(ctx, grad_out, _grad_xa, _grad_z):
    x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, seed = ctx.saved_tensors
    scale, rank, grad_rank_start, dropout_p, backend_name = ctx.args
    needs = ctx.needs_input_grad  # x, weight, bias, lora_A, lora_B, magnitude, weight_norm, ...
    if needs[5] and z.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError("dora_fwd was called with save_z=False, so the magnitude has no gradient")
    bwd = _dora_bwd if getattr(ctx, "eager", False) else dora_bwd  # traced (compile, opcheck): the registered op
    dx, dA, dB, dm = bwd(grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, xa, z, scale, rank,
                              grad_rank_start, dropout_p, seed, needs[0], needs[3] or needs[4], needs[5],
                              backend_name)  # fmt: skip
    # W0 and bias are frozen in a DoRA layer; should a caller train them anyway, their gradients are plain (the norm
    # is a constant for W0 too): dW0 = (g dy)^T x, or dy^T x + ((g - 1) dy)^T drop(x) with dropout.
    d_weight = None
    if needs[1]:
        compute = naive.compute_dtype(grad_out.dtype)
        dy, xc = grad_out.to(compute), x.to(compute)
        g = magnitude.to(compute) / weight_norm.to(compute)
        if dropout_p == 0.0:
            d_weight = (dy * g).t() @ xc
        else:
            x_adapter = xc * naive.dropout_mask(seed_int(seed), tuple(x.shape), dropout_p, x.device).to(compute)
            d_weight = dy.t() @ xc + (dy * (g - 1)).t() @ x_adapter
        d_weight = d_weight.to(weight.dtype)
    d_bias = grad_out.sum(0) if needs[2] else None
    return (dx if needs[0] else None, d_weight, d_bias, dA if needs[3] else None, dB if needs[4] else None,
            dm if needs[5] else None, None, None, None, None, None, None, None)  # fmt: skip


_EagerDoRA = register_autograd(dora_fwd, _dora_fwd, _backward, _setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Functional API: checks first, so no backend ever sees a shape, dtype, device or rank it could misread.
# ---------------------------------------------------------------------------------------------------------------


def weight_norm_sq(weight: Tensor) -> Tensor:
    """``||W0_n||^2`` for every row: [N] float32 (float64 for float64), the cache ``dora_linear`` takes."""
    check_tensor("weight", weight, ndim=2)
    return naive.weight_norm_sq(weight)


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
    Never forms ``W0 + s B A``: the factored norm, one pass over W0, rows that cancel computed directly
    (``naive.row_norm``). Pass the result to ``dora_linear(..., weight_norm=...)`` while A, B and W0 are unchanged.
    """
    check_tensor("weight", weight, ndim=2)
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        check_tensor(name, t, ndim=2)
        check_like(name, t, "weight", weight)
    probe = weight.new_empty(0, weight.shape[1])  # check_lora_inputs checks shapes and rank against an x [0, K]
    b = check_lora_inputs(probe, weight, None, lora_A, lora_B, None, rank)
    scale = check_scale(scale)
    if weight_norm_sq is not None:
        check_vector("weight_norm_sq", weight_norm_sq, weight.shape[0], "out_features", "weight", weight,
                     same_dtype=False)  # fmt: skip
        weight_norm_sq = weight_norm_sq.detach().to(naive.compute_dtype(weight.dtype))
    norm = dora_norm if torch.compiler.is_compiling() else _dora_norm  # no autograd: the body alone in eager mode
    return norm(weight.detach(), lora_A.detach(), lora_B.detach(), weight_norm_sq, scale, b)


@once_per_signature
def check_dora_inputs(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, rank) -> int:
    """``check_lora_inputs`` and DoRA's two vectors: magnitude [N] (x's dtype), weight_norm [N] | None (any float)."""
    b = check_lora_inputs(x, weight, bias, lora_A, lora_B, None, rank)
    N = weight.shape[0]
    check_vector("magnitude", magnitude, N, "out_features", "x", x)
    if weight_norm is not None:
        check_vector("weight_norm", weight_norm, N, "out_features", "x", x, same_dtype=False)
    return b


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
    b = check_dora_inputs(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, rank)
    N = weight.shape[0]
    scale, dropout = check_scale(scale), check_dropout(dropout)
    seed_t = seed_tensor(dropout, seed)
    if weight_norm is None:
        weight_norm = dora_weight_norm(weight, lora_A, lora_B, scale=scale, rank=b, weight_norm_sq=weight_norm_sq)
    else:
        weight_norm = cast(weight_norm.detach() if weight_norm.requires_grad else weight_norm,
                           naive.compute_dtype(x.dtype))  # fmt: skip
    save_z = torch.is_grad_enabled() and magnitude.requires_grad
    lo = b - 1 if frozen else 0  # the first rank that trains
    args = (as_rows(x), weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, b, lo, dropout, seed_t, save_z)
    y, _, _ = run_registered(dora_fwd, _EagerDoRA, _dora_fwd, args, (x, weight, bias, lora_A, lora_B, magnitude))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)
