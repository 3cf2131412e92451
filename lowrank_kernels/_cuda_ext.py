"""The CUDA C++ extension ``lowrank_kernels._C`` (built from ``csrc/``) as the ops' ``cuda.py`` files call it.

One runtime (the extension on the tensors' device and its current stream) and one typed wrapper per binding: the
strided GEMM with its epilogue (``gemm``, ``csrc/gemm.cu``), the dropout kernels, the column dot and DoRA's row-norm
finish (``csrc/elementwise.cu``). A wrapper checks what the extension would misread (shapes, dtypes, devices),
allocates nothing it does not return, and hands raw device pointers, int64 strides and the stream over, by keyword:
the binding's argument names are those of ``csrc/ops.h``. Every launch goes through ``runtime(device)``, the one
place a test replaces to record the calls on a machine without a GPU. The dense products ``x W0^T`` and ``dy W0``
stay with cuBLAS in the callers. The extension is imported on first use, never at import.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/ops.h DTypeCode
MASK_NONE, MASK_A, MASK_B, MASK_C = 0, 1, 2, 3  # csrc/ops.h MaskOn: the GEMM operand that carries x's dropout mask


@functools.cache
def extension():
    """The compiled module ``lowrank_kernels._C`` (ImportError if it was not built or does not load)."""
    return importlib.import_module("lowrank_kernels._C")


class Runtime:
    """Where the wrappers send their calls: the extension, on ``device`` and its current stream."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"the CUDA extension needs CUDA tensors, got {device.type}")
        self.device = device
        self.ext = extension()
        self.stream = torch.cuda.current_stream(device).cuda_stream

    def __call__(self, fn: str, **kwargs) -> None:
        with torch.cuda.device(self.device):  # kernels launch on the current device: make it the tensors'
            getattr(self.ext, fn)(**kwargs, stream=self.stream)


def runtime(device: torch.device) -> Runtime:
    """The runtime for tensors on ``device``."""
    return Runtime(device)


# ---- argument helpers ------------------------------------------------------------------------------------------


def code(t: Tensor) -> int:
    """The extension's dtype code of ``t`` (TypeError for a dtype its kernels do not take)."""
    dtype_code = DTYPE_CODES.get(t.dtype)
    if dtype_code is None:
        raise TypeError(f"CUDA extension kernels take float16/bfloat16/float32, got {t.dtype}")
    return dtype_code


def check_inputs(dtype: torch.dtype, device: torch.device, **tensors: Tensor | None) -> None:
    """Every named tensor is on ``device`` and, floating, of ``dtype`` (float64 anywhere: TypeError)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype == torch.float64 or dtype == torch.float64:
            raise TypeError(f"CUDA extension kernels take float16/bfloat16/float32, {name} is float64")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")


def vector(t: Tensor | None, n: int, name: str) -> Tensor | None:
    """``t[:n]`` as a contiguous float32 vector (what the kernels read), None stays None."""
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] < n:
        raise ValueError(f"{name} must be 1-D with at least {n} entries, got shape {tuple(t.shape)}")
    return t[:n].to(torch.float32).contiguous()


def ptr(t: Tensor | None) -> int:
    """The address the kernels read (0 for an absent optional argument)."""
    return 0 if t is None else t.data_ptr()


def operand(name: str, t: Tensor | None) -> dict[str, int]:
    """An operand as the bindings take it: its address ``name`` and element strides ``name_s0``, ``name_s1``, ...
    (an absent optional operand: a 2-D one at address 0, strides 0)."""
    strides = (0, 0) if t is None else t.stride()
    return {name: ptr(t)} | {f"{name}_s{i}": s for i, s in enumerate(strides)}


def check_device(device: torch.device, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"operand {name} is on {t.device}, expected {device}")


def check_f32_vector(name: str, v: Tensor | None, n: int) -> None:
    if v is not None and (v.dtype != torch.float32 or v.dim() != 1 or v.shape[0] != n or v.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous float32 [{n}], got {tuple(v.shape)} {v.dtype}")


@dataclass(frozen=True)
class Mask:
    """x's dropout mask, applied to one GEMM operand (``MASK_A``, ``MASK_B`` or ``MASK_C``) at that operand's
    (row, column), hashed as ``row * cols + col``: ``cols`` is x's column count."""

    operand: int
    p: float
    seed: int
    cols: int

    def __post_init__(self) -> None:
        if self.operand not in (MASK_A, MASK_B, MASK_C) or not (0.0 < self.p < 1.0 and self.cols > 0):
            raise ValueError(f"a dropout mask needs an operand, 0 < p < 1 and cols > 0, got {self}")


def dropout_on(operand: int, p: float, seed: int, *, cols: int) -> Mask | None:
    """The mask of x on ``operand``, or None without dropout (p == 0)."""
    return None if p == 0.0 else Mask(operand, float(p), int(seed) & 0xFFFFFFFF, cols)


# ---- the bindings ----------------------------------------------------------------------------------------------


def gemm(
    a: Tensor,
    b: Tensor,
    c: Tensor,
    *,
    alpha: float = 1.0,
    cin: Tensor | None = None,
    beta: float = 0.0,
    k_scale: Tensor | None = None,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    post_scale: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Mask | None = None,
) -> None:
    """``c = epilogue(a @ b)`` on the extension's GEMM (csrc/gemm.cu): a [M, K], b [K, N], c [M, N], any strides.

    Optional float32 vectors: k_scale [K], row_scale [M], col_scale [N], post_scale [N], bias [N]; ``cin`` [M, N]
    (c's dtype, may be c itself) enters as ``beta * cin``; ``mask`` puts x's dropout mask on one operand.
    """
    M, K = a.shape
    K2, N = b.shape
    if K2 != K or tuple(c.shape) != (M, N):
        raise ValueError(f"gemm shapes do not chain: a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}")
    if cin is not None and (tuple(cin.shape) != (M, N) or cin.dtype != c.dtype):
        raise ValueError(f"gemm cin must be [{M}, {N}] of c's dtype, got {tuple(cin.shape)} {cin.dtype}")
    if beta != 0.0 and cin is None:
        raise ValueError("gemm beta != 0 needs cin")
    for name, v, n in (("k_scale", k_scale, K), ("row_scale", row_scale, M), ("col_scale", col_scale, N),
                       ("post_scale", post_scale, N), ("bias", bias, N)):  # fmt: skip
        check_f32_vector(f"gemm {name}", v, n)
    check_device(c.device, a=a, b=b, cin=cin, k_scale=k_scale, row_scale=row_scale, col_scale=col_scale,
                 post_scale=post_scale, bias=bias)  # fmt: skip
    runtime(c.device)(
        "gemm",
        M=M, N=N, K=K, **operand("a", a), a_dtype=code(a), **operand("b", b), b_dtype=code(b),
        **operand("c", c), c_dtype=code(c), alpha=float(alpha), **operand("cin", cin), beta=float(beta),
        k_scale=ptr(k_scale), row_scale=ptr(row_scale), col_scale=ptr(col_scale), post_scale=ptr(post_scale),
        bias=ptr(bias),
        mask_on=MASK_NONE if mask is None else mask.operand, seed=0 if mask is None else mask.seed,
        p=0.0 if mask is None else mask.p, mask_cols=0 if mask is None else mask.cols,
    )  # fmt: skip


def dropout_combine(base: Tensor | None, src: Tensor, out: Tensor, *, scale_kept: bool, p: float, seed: int) -> None:
    """``out = base + drop(src)`` elementwise, [M, K] of one dtype, the mask of an [M, K] x (base None:
    ``out = src`` with its dropped entries zeroed, scaled by 1/(1-p) only with ``scale_kept``)."""
    M, K = src.shape
    for t in (base, out):
        if t is not None and (tuple(t.shape) != (M, K) or t.dtype != src.dtype):
            raise ValueError(f"dropout_combine operands must all be [{M}, {K}] {src.dtype}")
    check_device(out.device, base=base, src=src)
    runtime(out.device)(
        "dropout_combine", dtype=code(src), M=M, K=K, **operand("base", base), **operand("src", src),
        **operand("out", out), scale_kept=scale_kept, seed=int(seed) & 0xFFFFFFFF, p=float(p),
    )  # fmt: skip


def dora_dropout_output(base: Tensor, z: Tensor, dz: Tensor, *, dz_scale: float, g: Tensor, out: Tensor) -> None:
    """``out = base + g * z - dz_scale * dz`` elementwise (DoRA's dropout form): [M, N] of one dtype, g float32 [N];
    ``out`` may be ``base``."""
    M, N = base.shape
    for name, t in (("z", z), ("dz", dz), ("out", out)):
        if tuple(t.shape) != (M, N) or t.dtype != base.dtype:
            raise ValueError(f"dora_dropout_output {name} must be [{M}, {N}] {base.dtype}, got {tuple(t.shape)}")
    check_f32_vector("dora_dropout_output g", g, N)
    check_device(out.device, base=base, z=z, dz=dz, g=g)
    runtime(out.device)(
        "dora_dropout_output", dtype=code(base), M=M, N=N, **operand("base", base), **operand("z", z),
        **operand("dz", dz), dz_scale=float(dz_scale), g=g.data_ptr(), **operand("out", out),
    )  # fmt: skip


def col_dot(p: Tensor, q: Tensor) -> Tensor:
    """[N] float32 = sum over rows of p * q; p, q: [M, N] of one dtype, any strides."""
    M, N = p.shape
    if tuple(q.shape) != (M, N) or q.dtype != p.dtype:
        raise ValueError(f"col_dot operands must match: {tuple(p.shape)} {p.dtype} vs {tuple(q.shape)} {q.dtype}")
    check_device(p.device, q=q)
    out = torch.empty(N, device=p.device, dtype=torch.float32)
    runtime(p.device)("col_dot", dtype=code(p), M=M, N=N, **operand("p", p), **operand("q", q), out=out.data_ptr())
    return out


def dora_norm_finish(weight: Tensor, w0sq: Tensor | None, b: Tensor, c: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """DoRA's squared row norm from its factored parts: ``(w0sq + B_n . C_n, w0sq + B_n . Q_n)``, float32 [N] each.

    weight: W0 [N, K]; w0sq: float32 [N] ``||W0_n||^2`` | None (then summed from W0 in the same pass); b: B[:, :rank]
    [N, rank] of W0's dtype; c = 2s W0 A^T + s^2 B G and q = s^2 B G: float32 [N, rank]."""
    N, K = weight.shape
    rank = b.shape[1]
    if tuple(b.shape) != (N, rank) or b.dtype != weight.dtype:
        raise ValueError(f"dora_norm_finish b must be [{N}, rank] {weight.dtype}, got {tuple(b.shape)} {b.dtype}")
    for name, t in (("c", c), ("q", q)):
        if tuple(t.shape) != (N, rank) or t.dtype != torch.float32:
            raise ValueError(f"dora_norm_finish {name} must be float32 [{N}, {rank}], got {tuple(t.shape)} {t.dtype}")
    check_f32_vector("dora_norm_finish w0sq", w0sq, N)
    check_device(weight.device, w0sq=w0sq, b=b, c=c, q=q)
    norm_sq = torch.empty(N, device=weight.device, dtype=torch.float32)
    reference_sq = torch.empty(N, device=weight.device, dtype=torch.float32)
    runtime(weight.device)(
        "dora_norm_finish", dtype=code(weight), N=N, K=K, rank=rank, **operand("w", weight), w0sq=ptr(w0sq),
        **operand("b", b), **operand("c", c), **operand("q", q), norm_sq=norm_sq.data_ptr(),
        reference_sq=reference_sq.data_ptr(),
    )  # fmt: skip
    return norm_sq, reference_sq


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device | str) -> Tensor:
    """The mask (0 or 1/(1-p), float32 [M, K]) these kernels apply to an [M, K] x for ``seed`` (for tests)."""
    M, K = shape
    device = torch.device(device)
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    runtime(device)("dropout_mask", M=M, K=K, **operand("out", out), seed=int(seed) & 0xFFFFFFFF, p=float(p))
    return out
