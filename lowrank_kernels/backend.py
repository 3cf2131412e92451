"""Which implementation runs an op: ``torch`` (reference), ``triton`` or ``cuda`` (the csrc extension).

Choice, first match wins:
1. the innermost ``use_backend(name)`` context;
2. the ``LOWRANK_KERNELS_BACKEND`` environment variable (``torch|triton|cuda``, or ``auto``);
3. auto: for CUDA tensors Triton, then the CUDA extension, then torch; torch for everything else.

A backend asked for by name must be able to run the call, or the call raises ``BackendUnavailableError``
with the reason. An automatically chosen backend that cannot take the inputs is skipped; one that fails while
running is reported once as a warning and the next candidate runs (torch, the reference, always can).
Importing this module imports neither Triton nor the extension.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "LOWRANK_KERNELS_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowrank_kernels_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run this call (not installed, no GPU, unsupported input)."""


class UnsupportedInputError(Exception):
    """Raised by a backend implementation for inputs it does not handle (e.g. float64 in Triton)."""


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


def interpreter_active() -> bool:
    """Triton's CPU interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1): the test suite's mode."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure means "unavailable"; keep why, show it when asked for
        return f"{type(exc).__name__}: {exc}"
    return None


def availability(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    _check_name(name, "backend")
    if name == "torch":
        return None
    if name == "triton":
        if device.type != "cuda" and not interpreter_active():
            return f"Triton needs CUDA tensors (got {device.type}; TRITON_INTERPRET=1 runs it on the CPU)"
        err = _import_error("triton")
        return None if err is None else f"Triton is not importable ({err})"
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors (got {device.type})"
    err = _import_error("lowrank_kernels._C")
    return None if err is None else f"the CUDA extension lowrank_kernels._C is not built or failed to load ({err})"


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [name for name in BACKENDS if availability(name, device) is None]


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton and the CUDA C++ kernels take


def _kernel_impl(label: str, module: str, fn_name: str) -> Callable:
    """``lowrank_kernels.kernels.<module>.<fn_name>``, imported on first call, behind the dtype rule shared by the
    Triton and the CUDA C++ kernels: floating-point tensor arguments outside KERNEL_DTYPES (e.g. float64) raise
    UnsupportedInputError, so an automatic choice moves on to the next backend; integer metadata passes through."""

    def run(*args, **kwargs):
        dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
        if not dtypes <= set(KERNEL_DTYPES):
            got = sorted(map(str, dtypes))
            raise UnsupportedInputError(f"{label} kernels take float16/bfloat16/float32, got {got}")
        return getattr(importlib.import_module(f"lowrank_kernels.kernels.{module}"), fn_name)(*args, **kwargs)

    return run


def triton_impl(module: str, fn_name: str) -> Callable:
    """The Triton launcher ``lowrank_kernels.kernels.<module>.<fn_name>``: importing the package never needs Triton."""
    return _kernel_impl("Triton", module, fn_name)


def cuda_impl(module: str, fn_name: str) -> Callable:
    """The CUDA C++ launcher ``lowrank_kernels.kernels.<module>.<fn_name>`` (``cuda_ext``, which loads the compiled
    extension ``lowrank_kernels._C`` on first use): same interface and dtype rule as ``triton_impl``."""
    return _kernel_impl("CUDA extension", module, fn_name)


_warned: set[tuple[str, str]] = set()


def dispatch(op: str, impls: Mapping[str, Callable], device: torch.device, *args, **kwargs):
    """Call ``impls[backend](*args, **kwargs)`` for the backend chosen for ``device`` (see the module docstring)."""
    name = requested_backend()
    if name is not None:
        reason = availability(name, device) or (None if name in impls else f"op {op} has no {name} implementation")
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} was requested for {op} but {reason}")
        try:
            return impls[name](*args, **kwargs)
        except UnsupportedInputError as exc:
            raise BackendUnavailableError(f"backend {name!r} was requested for {op} but {exc}") from exc

    candidates = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
    for name in candidates:
        if name not in impls or availability(name, device) is not None:
            continue
        if name == "torch":
            return impls[name](*args, **kwargs)
        try:
            return impls[name](*args, **kwargs)
        except UnsupportedInputError:
            continue
        except Exception as exc:  # an automatic choice that fails falls back (Liger's rule); say so once
            if (op, name) not in _warned:
                _warned.add((op, name))
                warnings.warn(
                    f"lowrank_kernels: {name} backend failed for {op} ({type(exc).__name__}: {exc}); "
                    "falling back to the next backend",
                    RuntimeWarning,
                    stacklevel=2,
                )
    raise BackendUnavailableError(f"no backend can run {op} on {device}")  # unreachable: torch runs anywhere
