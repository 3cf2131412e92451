"""LoRA / DyLoRA as ``torch.library`` ops with autograd, and the functional entry point ``lora_linear``.

``lowrank_kernels::lora_fwd`` and ``lowrank_kernels::lora_bwd`` are custom ops with fake (meta) implementations,
so ``torch.compile(fullgraph=True)`` traces through them; ``register_autograd`` ties them together. Each op's
body hands its inputs to the backend chosen by ``lowrank_kernels.backend`` (reference math in
``lowrank_kernels.reference``, Triton kernels in ``lowrank_kernels.kernels.lora``, CUDA C++ in
``lowrank_kernels.kernels.cuda_ext``).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..backend import cuda_impl, dispatch, requested_backend, triton_impl, use_backend
from ..reference import lora as reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_FORWARD_IMPLS = {
    "torch": reference.lora_forward,
    "triton": triton_impl("lora", "lora_forward"),
    "cuda": cuda_impl("cuda_ext", "lora_forward"),
}
_BACKWARD_IMPLS = {
    "torch": reference.lora_backward,
    "triton": triton_impl("lora", "lora_backward"),
    "cuda": cuda_impl("cuda_ext", "lora_backward"),
}


def _seed_int(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())  # a CPU tensor: no device sync


def _xa_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("lowrank_kernels::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    rank_scale: Tensor | None,
    scale: float,
    rank: int,
    grad_rank_start: int,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x: [M, K] -> (y [M, N], xa [M, R] float32). ``grad_rank_start`` is only read by the backward.

    ``seed`` is a CPU int64 scalar tensor (None without dropout): a tensor, so torch.compile traces its draw.
    """
    args = (x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, dropout_p, _seed_int(seed))
    if x.shape[0] == 0:  # nothing to launch; the reference handles empty batches
        return reference.lora_forward(*args)
    return dispatch("lora_fwd", _FORWARD_IMPLS, x.device, *args)


@lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, grad_rank_start, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0], dtype=_xa_dtype(x))


@torch.library.custom_op("lowrank_kernels::lora_bwd", mutates_args=())
def lora_bwd(
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
    seed: Tensor | None,
    needs_dx: bool,
    needs_dAB: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dA, dB, dv); dx (dA, dB) is empty [0] unless needs_dx (needs_dAB); dv empty without v.

    ``backend``: the backend the forward was asked to use ("" for the automatic choice). Autograd runs a CUDA
    backward on its own thread, where the forward's ``use_backend`` context is not visible, so it travels here.
    """
    args = (
        grad_out,
        x,
        weight,
        lora_A,
        lora_B,
        rank_scale,
        xa,
        scale,
        rank,
        grad_rank_start,
        dropout_p,
        _seed_int(seed),
    )
    if x.shape[0] == 0:
        dx, dA, dB, dv = reference.lora_backward(*args, needs_dx=needs_dx, needs_dAB=needs_dAB)
    else:
        with use_backend(backend or None):
            dx, dA, dB, dv = dispatch(
                "lora_bwd", _BACKWARD_IMPLS, x.device, *args, needs_dx=needs_dx, needs_dAB=needs_dAB
            )
    return dx, dA, dB, x.new_empty(0) if dv is None else dv


@lora_bwd.register_fake
def _(grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start, dropout_p, seed, needs_dx,
      needs_dAB, backend):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dAB else x.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dAB else x.new_empty(0)
    dv = x.new_empty(0) if rank_scale is None else torch.empty_like(rank_scale)
    return dx, dA, dB, dv


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, grad_rank_start, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, rank_scale, output[1], seed)
    ctx.args = (scale, rank, grad_rank_start, dropout_p, requested_backend() or "")
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_xa):
    x, weight, lora_A, lora_B, rank_scale, xa, seed = ctx.saved_tensors
    scale, rank, grad_rank_start, dropout_p, backend = ctx.args
    needs = ctx.needs_input_grad  # x, weight, bias, lora_A, lora_B, rank_scale, ...
    needs_dAB = needs[3] or needs[4] or needs[5]
    dx, dA, dB, dv = lora_bwd(grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start,
                              dropout_p, seed, needs[0], needs_dAB, backend)  # fmt: skip
    # W0 and bias are frozen in a LoRA layer; should a caller train them anyway, their gradients are plain.
    d_weight = grad_out.t().to(x.dtype) @ x if needs[1] else None
    d_bias = grad_out.sum(0) if needs[2] else None
    return (dx if needs[0] else None, d_weight, d_bias, dA if needs[3] else None, dB if needs[4] else None,
            dv if needs[5] else None, None, None, None, None, None)  # fmt: skip


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Functional API: checks first, so no backend ever sees a shape, dtype, device or rank it could misread.
# ----------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, *, ndim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_lora_inputs(x, weight, bias, lora_A, lora_B, rank_scale, rank) -> int:
    """Validate ``lora_linear``'s tensors and rank; returns the active rank."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    _check_tensor("weight", weight, ndim=2)
    _check_tensor("lora_A", lora_A, ndim=2)
    _check_tensor("lora_B", lora_B, ndim=2)
    N, K = weight.shape
    R = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({K})")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be [r, in_features] = [r, {K}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, R):
        raise ValueError(f"lora_B must be [out_features, r] = [{N}, {R}], got {tuple(lora_B.shape)}")
    if R < 1:
        raise ValueError("lora_A must have at least one rank (row)")
    named = [("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [out_features] = [{N}], got {tuple(bias.shape)}")
        named.append(("bias", bias))
    if rank_scale is not None:
        _check_tensor("rank_scale", rank_scale, ndim=1)
        if rank_scale.shape[0] != R:
            raise ValueError(f"rank_scale must be [r] = [{R}], got {tuple(rank_scale.shape)}")
        named.append(("rank_scale", rank_scale))
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    if rank is None:
        return R
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= R:
        raise ValueError(f"rank must be in [1, {R}] (the allocated rank of lora_A/lora_B), got {rank}")
    return int(rank)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
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
    """``x W0^T + bias + scale * ((drop(x) A[:rank]^T) * rank_scale[:rank]) B[:, :rank]^T``, fused.

    x: [..., K]; weight: [N, K] (W0, frozen); bias: [N] | None; lora_A: [R, K]; lora_B: [N, R];
    rank: active rank b in [1, R] (default R); rank_scale: [R] per-rank scale (AdaLoRA) | None;
    dropout: probability on the adapter input only (the base path sees x); seed: the dropout mask's seed
    (default: drawn from torch's generator, so ``torch.manual_seed`` makes runs repeatable);
    frozen: DyLoRA frozen mode, only rank ``rank - 1`` of A and B gets gradient. Returns [..., N].
    """
    b = check_lora_inputs(x, weight, bias, lora_A, lora_B, rank_scale, rank)
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    seed_t = None
    if dropout > 0.0:
        if seed is None:  # torch's CPU generator: repeatable under torch.manual_seed, no device sync
            seed_t = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
        else:
            seed_t = torch.tensor(int(seed), dtype=torch.int64)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y, _ = torch.ops.lowrank_kernels.lora_fwd(x2d, weight, bias, lora_A, lora_B, rank_scale, float(scale), b,
                                              b - 1 if frozen else 0, float(dropout), seed_t)  # fmt: skip
    return y.reshape(*lead, weight.shape[0])


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str = "cpu") -> Tensor:
    """The adapter-input dropout mask (float32 [M, K], 0 or 1/(1-p)) that every backend applies for ``seed``."""
    return reference.dropout_mask(seed, tuple(shape), p, device)
