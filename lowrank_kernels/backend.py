"""Which implementation runs an op: ``torch`` (the naive reference), ``triton`` or ``cuda`` (the csrc extension).

Choice, first match wins:
1. the innermost ``use_backend(name)`` context;
2. the ``LOWRANK_KERNELS_BACKEND`` environment variable (``torch|triton|cuda``, or ``auto``);
3. auto: for CUDA tensors Triton, then the CUDA extension, then torch; torch for everything else.

A backend is *unavailable* for a call when it is not importable, has no device for the tensors, or does not take
their dtype (the kernels take float16/bfloat16/float32; float64 is the reference's alone). That is decided before
anything launches. A backend asked for by name that is unavailable raises ``BackendUnavailableError`` with the
reason; the automatic choice skips it. Nothing here catches an exception from a launched kernel: a kernel bug on
valid inputs propagates (no silent fallback; after a sticky CUDA error a fallback could not run anyway).
``LOWRANK_KERNELS_STRICT=1`` (CI, the GPU run) also forbids the automatic choice to skip the device's first
backend for want of Triton or the extension: a CUDA call then runs on Triton or raises.
Importing this module imports neither Triton nor the extension.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "LOWRANK_KERNELS_BACKEND"
STRICT_ENV_VAR = "LOWRANK_KERNELS_STRICT"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton and the CUDA C++ kernels take
_KERNEL_DTYPE_SET = frozenset(KERNEL_DTYPES)

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowrank_kernels_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend requested by name (or, in strict mode, the automatic first choice) cannot run this call."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} (or 'auto' in the environment), got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``None``: automatic choice)."""
    token = _override.set(None if name is None else _check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str | None:
    """The backend asked for by name (context manager, then environment), or None for the automatic choice."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env, ENV_VAR)


def strict() -> bool:
    """``LOWRANK_KERNELS_STRICT=1``: the automatic choice never moves past the device's first backend."""
    return os.environ.get(STRICT_ENV_VAR, "0").strip() == "1"


def interpreter_active() -> bool:
    """Triton's CPU interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1): the test suite's mode."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def import_error(module: str) -> str | None:
    """Why ``module`` does not import (None if it does); kept, and shown when that backend is asked for."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure means "unavailable"; keep why
        return f"{type(exc).__name__}: {exc}"
    return None


def availability(name: str, device: torch.device | str) -> str | None:
    """None if backend ``name`` can run on ``device`` in this process, else the reason it cannot."""
    _check_name(name, "backend")
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    # The interpreter matters for CPU tensors only; CUDA calls skip the environment read (~1 us).
    return _availability(name, device_type, device_type != "cuda" and interpreter_active())


@functools.cache  # what it reads is fixed for the process (but the interpreter switch, part of the key)
def _availability(name: str, device_type: str, interpret: bool) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        elif not interpret:
            return f"Triton needs CUDA tensors (got {device_type}; TRITON_INTERPRET=1 runs it on the CPU)"
        err = import_error("triton")
        return None if err is None else f"Triton is not importable ({err})"
    if device_type != "cuda":
        return f"the CUDA extension needs CUDA tensors (got {device_type})"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    err = import_error("lowrank_kernels._C")
    return None if err is None else f"the CUDA extension lowrank_kernels._C is not built or failed to load ({err})"


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run on ``device`` in this process (``torch`` always; the kernels only with a GPU)."""
    return [name for name in BACKENDS if availability(name, device) is None]


def _dtype_reason(name: str, tensors: Sequence[torch.Tensor | None]) -> str | None:
    """None if backend ``name`` takes every floating dtype among ``tensors``, else why not."""
    if name == "torch":
        return None
    for t in tensors:  # a loop, not a set of dtypes: on every call's host path
        if t is not None and t.dtype not in _KERNEL_DTYPE_SET and t.dtype.is_floating_point:
            floating = {str(u.dtype) for u in tensors if u is not None and u.dtype.is_floating_point}
            return f"its kernels take float16/bfloat16/float32, got {sorted(floating)}"
    return None


def choose(op: str, device: torch.device, tensors: Sequence[torch.Tensor | None]) -> str:
    """The backend that runs ``op`` on ``device`` for these tensor arguments (see the module docstring)."""
    name = requested_backend()
    if name is None and device.type != "cuda":
        return "torch"
    if name is not None:
        reason = availability(name, device) or _dtype_reason(name, tensors)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} was requested for {op} but {reason}")
        return name
    if _dtype_reason("triton", tensors) is not None:  # float64: the reference's alone, decided by dtype
        return "torch"
    for name in ("triton", "cuda"):
        reason = availability(name, device)
        if reason is None:
            return name
        if strict():
            raise BackendUnavailableError(f"{STRICT_ENV_VAR}=1 and {op} cannot run on {name}: {reason}")
    return "torch"
