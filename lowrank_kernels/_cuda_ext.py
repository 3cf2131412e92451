"""The CUDA C++ extension ``lowrank_kernels._C`` (built from ``csrc/``) as the ops' ``cuda.py`` files call it.

One runtime (the extension on the tensors' device and current stream) and typed wrappers of its bindings: the one
strided GEMM with its epilogue (``gemm``, ``csrc/gemm.cu``), the dropout mask and combine kernels, the column dot.
Each wrapper checks what the extension would misread (shapes, dtypes, devices) and hands raw device pointers, int64
strides and the stream over. The dense products ``x W0^T`` and ``dy W0`` stay with cuBLAS in the callers. The
extension is imported on first use, never at import.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/ops.h DTypeCode
MASK_NONE, MASK_A, MASK_B, MASK_C = 0, 1, 2, 3  # csrc/ops.h MaskOn: the GEMM operand that carries x's dropout mask


@functools.cache
def extension():
    """The compiled module ``lowrank_kernels._C`` (ImportError if it was not built or does not load)."""
    return importlib.import_module("lowrank_kernels._C")


class Runtime:
    """Where the launchers send their calls: the extension, on ``device`` and its current stream."""

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
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"CUDA extension kernels take float16/bfloat16/float32, got {t.dtype}")
    return code


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


def check_xa(xa: Tensor, M: int, R: int) -> None:
    if xa.dtype != torch.float32 or tuple(xa.shape) != (M, R):
        raise ValueError(f"xa must be the forward's float32 [{M}, {R}], got {tuple(xa.shape)} {xa.dtype}")


def vector(t: Tensor | None, n: int, name: str) -> Tensor | None:
    """``t[:n]`` as a contiguous float32 vector (what the kernels read), None stays None."""
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] < n:
        raise ValueError(f"{name} must be 1-D with at least {n} entries, got shape {tuple(t.shape)}")
    return t[:n].to(torch.float32).contiguous()


def ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def keep_factor(p: float) -> float:
    """1 / (1 - p) in float32 arithmetic, as the reference's and the kernels' mask value."""
    one = torch.ones((), dtype=torch.float32)
    return (one / (one - torch.tensor(p, dtype=torch.float32))).item()


def dropout_args(mask_on: int, p: float, seed: int, cols: int) -> dict:
    """The gemm keyword arguments of x's dropout mask (none when p == 0)."""
    if p == 0.0:
        return {}
    return dict(mask_on=mask_on, seed=int(seed) & 0xFFFFFFFF, p=float(p), mask_cols=cols)


def gemm(
    rt: Runtime,
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
    mask_on: int = MASK_NONE,
    seed: int = 0,
    p: float = 0.0,
    mask_cols: int = 0,
) -> None:
    """``c = epilogue(a @ b)`` on the extension's GEMM (csrc/gemm.cu): a [M, K], b [K, N], c [M, N], any strides.

    Optional float32 vectors: k_scale [K], row_scale [M], col_scale [N], post_scale [N], bias [N]; ``cin`` [M, N]
    (c's dtype, may be c) enters as ``beta * cin``; ``mask_on`` names the operand carrying x's dropout mask.
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
        if v is not None and (v.dtype != torch.float32 or v.dim() != 1 or v.shape[0] != n or v.stride(0) != 1):
            raise ValueError(f"gemm {name} must be a contiguous float32 [{n}], got {tuple(v.shape)} {v.dtype}")
    for name, t in (("a", a), ("b", b), ("c", c), ("cin", cin)):
        if t is not None and t.device != rt.device:
            raise ValueError(f"gemm operand {name} is on {t.device}, expected {rt.device}")
    if mask_on != MASK_NONE and not (0.0 < p < 1.0 and mask_cols > 0):
        raise ValueError(f"gemm dropout needs 0 < p < 1 and mask_cols > 0, got p={p}, mask_cols={mask_cols}")
    rt(
        "gemm",
        M=M, N=N, K=K,
        a=a.data_ptr(), a_dtype=code(a), a_s0=a.stride(0), a_s1=a.stride(1),
        b=b.data_ptr(), b_dtype=code(b), b_s0=b.stride(0), b_s1=b.stride(1),
        c=c.data_ptr(), c_dtype=code(c), c_s0=c.stride(0), c_s1=c.stride(1),
        alpha=float(alpha), cin=ptr(cin), cin_s0=0 if cin is None else cin.stride(0),
        cin_s1=0 if cin is None else cin.stride(1), beta=float(beta),
        k_scale=ptr(k_scale), row_scale=ptr(row_scale), col_scale=ptr(col_scale), post_scale=ptr(post_scale),
        bias=ptr(bias), mask_on=mask_on, seed=seed, p=p, mask_cols=mask_cols,
    )  # fmt: skip


def dropout_combine(rt: Runtime, base: Tensor | None, src: Tensor, out: Tensor, *, scale_kept: bool, p: float,
                     seed: int) -> None:  # fmt: skip
    """out = base + drop(src) elementwise, [M, K] of one dtype (base None: out = src with dropped entries zeroed,
    scaled by 1/(1-p) only with ``scale_kept``)."""
    M, K = src.shape
    for t in (base, out):
        if t is not None and (tuple(t.shape) != (M, K) or t.dtype != src.dtype):
            raise ValueError(f"dropout_combine operands must all be [{M}, {K}] {src.dtype}")
    rt(
        "dropout_combine",
        dtype=code(src), M=M, K=K,
        base=ptr(base), base_s0=0 if base is None else base.stride(0), base_s1=0 if base is None else base.stride(1),
        src=src.data_ptr(), src_s0=src.stride(0), src_s1=src.stride(1),
        out=out.data_ptr(), out_s0=out.stride(0), out_s1=out.stride(1),
        scale_kept=scale_kept, seed=int(seed) & 0xFFFFFFFF, p=float(p),
    )  # fmt: skip


def col_dot(rt: Runtime, p: Tensor, q: Tensor, shift: Tensor | None = None) -> Tensor:
    """[N] float32 = sum over rows of p * (q - shift); p, q: [M, N] of one dtype, shift: float32 [N] | None."""
    M, N = p.shape
    if tuple(q.shape) != (M, N) or q.dtype != p.dtype:
        raise ValueError(f"col_dot operands must match: {tuple(p.shape)} {p.dtype} vs {tuple(q.shape)} {q.dtype}")
    if shift is not None and (shift.dtype != torch.float32 or tuple(shift.shape) != (N,) or shift.stride(0) != 1):
        raise ValueError(f"col_dot shift must be a contiguous float32 [{N}]")
    out = torch.empty(N, device=p.device, dtype=torch.float32)
    rt("col_dot", dtype=code(p), M=M, N=N, p=p.data_ptr(), p_s0=p.stride(0), p_s1=p.stride(1), q=q.data_ptr(),
       q_s0=q.stride(0), q_s1=q.stride(1), shift=ptr(shift), out=out.data_ptr())  # fmt: skip
    return out


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device) -> Tensor:
    """The mask (0 or 1/(1-p), float32 [M, K]) that these kernels apply for ``seed`` (for tests)."""
    M, K = shape
    device = torch.device(device)
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    rt = runtime(device)
    rt("dropout_mask", M=M, K=K, out=out.data_ptr(), out_s0=out.stride(0), out_s1=out.stride(1),
       seed=int(seed) & 0xFFFFFFFF, p=float(p))  # fmt: skip
    return out
