"""Argument validation shared by every op: tensors, dtypes, devices, ranks, scales, dropout and its seed.

Each check raises ``TypeError`` / ``ValueError`` naming the argument, so no backend ever sees an input it could
misread. Nothing here imports a kernel or a module above the ops.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(v: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a rank or a count here)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_tensor(name: str, t, *, ndim: int | None = None) -> None:
    """``t`` is a floating-point tensor (of ``ndim`` dimensions when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_like(name: str, t: Tensor, ref_name: str, ref: Tensor, *, same_dtype: bool = True) -> None:
    """``t`` is on ``ref``'s device (and of its dtype unless ``same_dtype`` is False)."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share a device")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype")


def check_vector(name: str, t, n: int, what: str, ref_name: str, ref: Tensor, *, same_dtype: bool = True) -> None:
    """``t`` is a floating [n] tensor (``what`` names n, e.g. ``out_features``) beside ``ref``."""
    check_tensor(name, t, ndim=1)
    if t.shape[0] != n:
        raise ValueError(f"{name} must be [{what}] = [{n}], got {tuple(t.shape)}")
    check_like(name, t, ref_name, ref, same_dtype=same_dtype)


def once_per_signature(check):
    """``check``, run once per signature of its arguments and its result reused: the checks read only shapes, dtypes
    and devices of tensors (and the other arguments' values), so a call whose arguments have the signature of one
    that passed needs no checking again (a dict lookup instead of ~20 checks: the per-call host cost matters at
    decode sizes). Unhashable arguments are always checked; the cache is bounded."""
    passed: dict[tuple, object] = {}

    @functools.wraps(check)
    def checked(*args):
        if torch.compiler.is_compiling():  # traced once per graph anyway; a cache lookup would only add guards
            return check(*args)
        # type(a) in the key: 1, 1.0 and True are equal as dict keys but not as arguments.
        key = tuple([(a.shape, a.dtype, a.device) if isinstance(a, Tensor) else (type(a), a) for a in args])
        try:
            return passed[key]
        except KeyError:
            pass
        except TypeError:  # unhashable: nothing to cache against
            return check(*args)
        result = check(*args)
        if len(passed) > 4096:  # a long run over many shapes keeps checking, never grows without end
            passed.clear()
        passed[key] = result
        return result

    return checked


@once_per_signature
def check_lora_inputs(x, weight, bias, lora_A, lora_B, rank_scale, rank) -> int:
    """Validate a low-rank layer's tensors (x: [..., K], weight: [N, K], lora_A: [R, K], lora_B: [N, R], bias: [N],
    rank_scale: [R]) and active rank; returns the active rank (R when ``rank`` is None)."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
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
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_like(name, t, "x", x)
    if bias is not None:
        check_vector("bias", bias, N, "out_features", "x", x)
    if rank_scale is not None:
        check_vector("rank_scale", rank_scale, R, "r", "x", x)
    return check_rank(rank, R)


def check_rank(rank, R: int) -> int:
    """The active rank: ``rank`` in [1, R], or R when None."""
    if rank is None:
        return R
    if not is_int(rank):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= R:
        raise ValueError(f"rank must be in [1, {R}] (the allocated rank of lora_A/lora_B), got {rank}")
    return int(rank)


def check_scale(scale) -> float:
    if type(scale) is float and math.isfinite(scale):  # the common case, without the numbers.Real ABC check
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_dropout(dropout) -> float:
    if type(dropout) is float and 0.0 <= dropout < 1.0:
        return dropout
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return float(dropout)


def seed_tensor(dropout: float, seed: int | None) -> Tensor | None:
    """The dropout seed as a CPU int64 scalar (drawn from torch's generator when None), None without dropout.

    A CPU tensor so ``torch.compile`` traces its draw and reading it never syncs a device; ``torch.manual_seed``
    makes runs repeatable.
    """
    if dropout == 0.0:
        return None
    if seed is None:
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    if not is_int(seed) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return torch.tensor(int(seed), dtype=torch.int64)


def seed_int(seed: Tensor | None) -> int:
    """The int a kernel takes (0 without dropout): ``seed`` is a CPU tensor, so no device sync."""
    return 0 if seed is None else seed.item()  # no int(): traced (a triton_op's body), .item() is a graph node
