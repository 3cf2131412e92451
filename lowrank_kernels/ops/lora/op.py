"""LoRA / DyLoRA: ``y = x W0^T + bias + s * ((drop(x) A[:b]^T) * v[:b]) B[:, :b]^T`` as a ``torch.library`` op.

Follow a call top to bottom:

1. ``lora_linear`` checks every argument (``lowrank_kernels._checks``) and calls the registered op;
2. ``lowrank_kernels::lora_fwd`` / ``lora_bwd`` (``register_op``: ``triton_op`` s with fake implementations, tied by
   ``register_autograd``, so ``torch.compile(fullgraph=True)`` traces both directions and, on Triton, sees every
   kernel launch; eager calls skip the dispatch, ``run_registered``) pick a backend (``lowrank_kernels.backend``)
   and run
3. ``lora_forward`` / ``lora_backward`` below: the one orchestration, written over the backend's primitives
   ``shrink``, ``lowrank_matmul`` and ``weight_grad`` — ``naive.py`` (PyTorch: the spec and the CPU path),
   ``triton.py`` (the kernels; its one-launch decode kernel is an explicit override, ``fused_forward``) or
   ``cuda.py`` (the csrc extension). The math and its derivation: ``naive.py``.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType

import torch
from torch import Tensor

from ... import backend
from ..._checks import check_dropout, check_lora_inputs, check_scale, seed_int, seed_tensor
from . import naive


@functools.cache  # an import statement costs ~1 us a call
def primitives(package: str, backend_name: str) -> ModuleType:
    """Op package ``package``'s primitives on backend ``backend_name``: its ``naive``, ``triton`` or ``cuda`` module,
    imported on first use (Triton and the extension load only when a call runs on them)."""
    return importlib.import_module(f"{package}.{'naive' if backend_name == 'torch' else backend_name}")


def implementation(name: str) -> ModuleType:
    """The module holding this op's primitives on backend ``name``."""
    return primitives(__package__, name)


def contiguous_vector(t: Tensor | None) -> Tensor | None:
    """1-D arguments reach the kernels contiguous (a strided vector costs nothing to copy); None stays None."""
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# The orchestration: forward and backward, once, over a backend's primitives.
# ---------------------------------------------------------------------------------------------------------------


def lowrank_forward(impl, x, weight, bias, lora_A, lora_B, rank_scale, *, scale, rank, p_drop, seed,
                    col_scale=None, save_z=False) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """``(y, xa, z)``: ``xa = drop(x) A[:rank]^T`` [M, R] (zero past rank), then the GEMM with the low-rank term in its
    epilogue (``naive.lowrank_matmul``: ``col_scale`` and ``z`` are DoRA's). A backend may fuse both into one launch
    (``fused_forward``, Triton at decode sizes); it returns None where it does not apply."""
    fused = getattr(impl, "fused_forward", None)
    if fused is not None:
        out = fused(x, weight, bias, lora_A, lora_B, rank_scale, scale=scale, rank=rank, p_drop=p_drop, seed=seed,
                    col_scale=col_scale, save_z=save_z)  # fmt: skip
        if out is not None:
            return out
    xa = impl.shrink(x, lora_A, rank, p_drop=p_drop, seed=seed)
    y, z = impl.lowrank_matmul(x, weight, bias, xa, lora_B, rank_scale, scale=scale, rank=rank,
                               col_scale=col_scale, save_z=save_z)  # fmt: skip
    return y, xa, z


def lora_forward(impl, x, weight, bias, lora_A, lora_B, rank_scale, *, scale, rank, p_drop, seed):
    """x: [M, K] -> (y [M, N] in x's dtype, xa [M, R] = drop(x) A[:rank]^T in the compute dtype, zero past rank)."""
    y, xa, _ = lowrank_forward(impl, x, weight, bias, lora_A, lora_B, rank_scale, scale=scale, rank=rank,
                               p_drop=p_drop, seed=seed)  # fmt: skip
    return y, xa


def lora_backward(impl, dy, x, weight, lora_A, lora_B, rank_scale, xa, *, scale, rank, grad_rank_start, p_drop,
                  seed, needs_dx, needs_dAB) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(dx [M, K], dA [R, K], dB [N, R], dv [R] | None); dx (dA, dB) is an empty [0] tensor unless needed.

    ``dyb = dy B[:, :b]``; ``dx = dy W0 + s drop'((dyb * v) A)`` (the GEMM over N with A^T as the "up" matrix);
    ``dA = s (dyb * v)^T drop(x)``, ``dB = s dy^T (xa * v)`` over ranks ``[grad_rank_start, rank)``, zero elsewhere.
    ``weight`` None (``lora_delta``: a base product that is not ours): dx of the adapter term alone, the GEMM over an
    empty base (dy's first 0 columns times a [K, 0] weight: zeros, no reduction).
    """
    lo = grad_rank_start
    dyb = impl.shrink(dy, lora_B.t(), rank)
    dx = x.new_empty(0)
    if needs_dx:
        base, w = (dy, weight.t()) if weight is not None else (dy[:, :0], lora_A.new_empty(lora_A.shape[1], 0))
        dx, _ = impl.lowrank_matmul(base, w, None, dyb, lora_A.t(), rank_scale, scale=scale, rank=rank,
                                    p_drop=p_drop, seed=seed, epilogue_dropout=p_drop > 0.0)  # fmt: skip
    dA, dB = x.new_empty(0), x.new_empty(0)  # distinct tensors: custom-op outputs may not alias
    if needs_dAB:
        dA = lora_A.new_zeros(lora_A.shape)
        dB = lora_B.new_zeros(lora_B.shape)
        if lo < rank:
            grad = dict(scale=scale, rank_start=lo, rank=rank)
            dA[lo:rank] = impl.weight_grad(dyb, x, rank_scale, p_drop=p_drop, seed=seed, **grad)
            dB[:, lo:rank] = impl.weight_grad(xa, dy, rank_scale, **grad).t()
    dv = None
    if rank_scale is not None:
        dv = rank_scale.new_zeros(rank_scale.shape)
        dv[lo:rank] = scale * (xa[:, lo:rank] * dyb[:, lo:rank]).sum(0)
    return dx, dA, dB, dv


def backend_for(op: str, x: Tensor, weight: Tensor, *tensors: Tensor | None) -> str:
    """The backend of this call; empty problems (M, K or N = 0: x or ``weight``, [N, *], empty) need no kernel and run
    on the reference."""
    if x.numel() == 0 or weight.numel() == 0:
        return "torch"
    return backend.choose(op, x.device, (x, weight, *tensors))


# ---------------------------------------------------------------------------------------------------------------
# Registration: ops with fake implementations and autograd.
# ---------------------------------------------------------------------------------------------------------------


def register_op(name: str, body, fake, backend_of):
    """``lowrank_kernels::<name>``, computed by ``body``, as a ``torch.library.triton_op``: a call that runs on
    Triton's compiled kernels is traced through ``body`` by ``torch.compile``, which then sees and schedules every
    launch (the launchers hand it ``wrap_triton`` kernels while compiling) and every torch op between them. Any
    other backend (the reference, the CUDA extension, the interpreter's kernels) runs ``body`` inside the opaque
    custom op ``<name>_opaque``. ``backend_of(*args)`` names the call's backend; a compiled graph keeps the one it
    was traced with. ``fake``, the shape rule, serves both (Dynamo never runs ``body`` on fake tensors)."""
    opaque = torch.library.custom_op(f"lowrank_kernels::{name}_opaque", body, mutates_args=())
    opaque.register_fake(fake)

    @functools.wraps(body)  # the schema is inferred from body's signature
    def traced_or_opaque(*args):
        if backend_of(*args) == "triton":
            from ..._triton_utils import kernels_compiled

            if kernels_compiled():
                return body(*args)
        return opaque(*args)

    op = torch.library.triton_op(f"lowrank_kernels::{name}", traced_or_opaque, mutates_args=())
    op.register_fake(fake)
    return op


def register_autograd(op, body, backward, setup_context) -> type[torch.autograd.Function]:
    """Tie ``backward`` to ``op`` (what ``torch.compile`` and ``opcheck`` trace) and return the same forward, setup and
    backward as an autograd Function without the op's dispatch (~100 us a call on a CPU), for eager mode
    (``run_registered``); its contexts carry ``ctx.eager``, so the backward calls the backward op's body directly."""
    op.register_autograd(backward, setup_context=setup_context)

    def eager_setup_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.eager = True

    methods = dict(forward=staticmethod(body), backward=staticmethod(backward),
                   setup_context=staticmethod(eager_setup_context))  # fmt: skip
    return type(f"Eager{body.__name__}", (torch.autograd.Function,), methods)


def _lora_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, rank_scale: Tensor | None,
              scale: float, rank: int, grad_rank_start: int, dropout_p: float,
              seed: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """x: [M, K] -> (y [M, N], xa [M, R] float32, float64 for float64 x). ``grad_rank_start`` is the backward's.

    ``seed`` is a CPU int64 scalar tensor (None without dropout): a tensor, so torch.compile traces its draw.
    """
    bias, rank_scale = contiguous_vector(bias), contiguous_vector(rank_scale)
    impl = implementation(_lora_fwd_backend(x, weight, bias, lora_A, lora_B, rank_scale))
    return lora_forward(impl, x, weight, bias, lora_A, lora_B, rank_scale, scale=scale, rank=rank, p_drop=dropout_p,
                        seed=seed_int(seed))  # fmt: skip


def _lora_fwd_backend(x, weight, bias, lora_A, lora_B, rank_scale, *_) -> str:
    return backend_for("lora_fwd", x, weight, bias, lora_A, lora_B, rank_scale)


def _lora_fwd_fake(x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, grad_rank_start, dropout_p, seed):
    xa_dtype = naive.compute_dtype(x.dtype)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0], dtype=xa_dtype)


lora_fwd = register_op("lora_fwd", _lora_fwd, _lora_fwd_fake, _lora_fwd_backend)


def _lora_bwd(grad_out: Tensor, x: Tensor, weight: Tensor | None, lora_A: Tensor, lora_B: Tensor,
              rank_scale: Tensor | None, xa: Tensor, scale: float, rank: int, grad_rank_start: int, dropout_p: float,
              seed: Tensor | None, needs_dx: bool, needs_dAB: bool,
              backend_name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dA, dB, dv); dx (dA, dB) is empty [0] unless needs_dx (needs_dAB); dv empty without v.

    ``backend_name``: the backend the forward was asked to use ("" for the automatic choice). Autograd runs a CUDA
    backward on its own thread, where the forward's ``use_backend`` context is not visible, so it travels here.
    """
    rank_scale = contiguous_vector(rank_scale)
    impl = implementation(_lora_bwd_backend(grad_out, x, weight, lora_A, lora_B, rank_scale, backend_name))
    dx, dA, dB, dv = lora_backward(impl, grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale=scale, rank=rank,
                                   grad_rank_start=grad_rank_start, p_drop=dropout_p, seed=seed_int(seed),
                                   needs_dx=needs_dx, needs_dAB=needs_dAB)  # fmt: skip
    return dx, dA, dB, x.new_empty(0) if dv is None else dv


def _lora_bwd_backend(grad_out, x, weight, lora_A, lora_B, rank_scale, *args) -> str:
    with backend.use_backend(args[-1] or None):  # backend_name
        return backend_for("lora_bwd", x, lora_B if weight is None else weight, grad_out, lora_A, lora_B, rank_scale)


def lora_bwd_fake(grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start, dropout_p, seed,
                   needs_dx, needs_dAB, backend_name):  # fmt: skip
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dA = torch.empty_like(lora_A) if needs_dAB else x.new_empty(0)
    dB = torch.empty_like(lora_B) if needs_dAB else x.new_empty(0)
    dv = x.new_empty(0) if rank_scale is None else torch.empty_like(rank_scale)
    return dx, dA, dB, dv


lora_bwd = register_op("lora_bwd", _lora_bwd, lora_bwd_fake, _lora_bwd_backend)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, grad_rank_start, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, rank_scale, output[1], seed)
    ctx.args = (scale, rank, grad_rank_start, dropout_p, backend.requested_backend() or "")
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_xa):
    x, weight, lora_A, lora_B, rank_scale, xa, seed = ctx.saved_tensors
    scale, rank, grad_rank_start, dropout_p, backend_name = ctx.args
    needs = ctx.needs_input_grad  # x, weight, bias, lora_A, lora_B, rank_scale, ...
    bwd = _lora_bwd if getattr(ctx, "eager", False) else lora_bwd  # traced (compile, opcheck): the registered op
    dx, dA, dB, dv = bwd(grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start,
                              dropout_p, seed, needs[0], needs[3] or needs[4] or needs[5], backend_name)  # fmt: skip
    # W0 and bias are frozen in a LoRA layer; should a caller train them anyway, their gradients are plain.
    d_weight = (grad_out.t() @ x.to(grad_out.dtype)).to(weight.dtype) if needs[1] else None
    d_bias = grad_out.sum(0) if needs[2] else None
    return (dx if needs[0] else None, d_weight, d_bias, dA if needs[3] else None, dB if needs[4] else None,
            dv if needs[5] else None, None, None, None, None, None)  # fmt: skip


_EagerLoRA = register_autograd(lora_fwd, _lora_fwd, _backward, _setup_context)


def as_rows(x: Tensor) -> Tensor:
    """x [..., K] as the [M, K] matrix the ops take (x itself when 2-D: a reshape costs ~1 us a call)."""
    if x.dim() == 2:
        return x
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not reshape(-1, K): that fails for K == 0


def run_registered(op, eager_function, body, args, tensors):
    """Run an op: the registered custom op under ``torch.compile``; in eager mode the autograd Function over the same
    body, or the body alone when nothing needs a gradient (inference pays no autograd plumbing)."""
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return eager_function.apply(*args)
    return body(*args)


# ---------------------------------------------------------------------------------------------------------------
# Functional API: checks first, so no backend ever sees a shape, dtype, device or rank it could misread.
# ---------------------------------------------------------------------------------------------------------------


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
    Any layout of any tensor argument is read correctly (strides are passed, 1-D vectors made contiguous).
    """
    b = check_lora_inputs(x, weight, bias, lora_A, lora_B, rank_scale, rank)
    scale, dropout = check_scale(scale), check_dropout(dropout)
    seed_t = seed_tensor(dropout, seed)
    args = (as_rows(x), weight, bias, lora_A, lora_B, rank_scale, scale, b, b - 1 if frozen else 0, dropout, seed_t)
    y, _ = run_registered(lora_fwd, _EagerLoRA, _lora_fwd, args, (x, weight, bias, lora_A, lora_B, rank_scale))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str = "cpu") -> Tensor:
    """The adapter-input dropout mask (float32 [M, K], 0 or 1/(1-p)) that every backend applies for ``seed``."""
    return naive.dropout_mask(seed, tuple(shape), p, device)
