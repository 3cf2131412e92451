"""Launchers of the CUDA C++ fallback kernels (``csrc/``, the extension ``lowrank_kernels._C``).

The same functions, arguments and returns as the Triton launchers (``kernels/lora.py``, ``kernels/dora.py``,
``kernels/multi_lora.py``), so the ops layer swaps one for the other; the math is the references'
(``lowrank_kernels/reference``). The dense products ``x W0^T`` and ``dy W0`` stay with cuBLAS (``F.linear`` /
``torch.mm``); every low-rank product runs on the extension's one strided GEMM (``csrc/gemm.cu``):

- LoRA forward: ``xa = drop(x) A[:b]^T`` (float32, the mask applied on load), then ``y += s (xa * v) B[:, :b]^T``
  in place on cuBLAS's ``x W0^T + bias``.
- LoRA backward: ``dyb = dy B[:, :b]``; ``dx = dy W0 + drop'(s (dyb * v) A[:b])`` (the mask in the GEMM's epilogue);
  ``dA = s (dyb * v)^T drop(x)`` and ``dB = s dy^T (xa * v)`` written straight into rows/columns
  ``[grad_rank_start, b)``; ``dv`` by a column dot product.
- DoRA norm: ``C = 2s W0 A^T + s^2 B (A A^T)`` ([N, b], two GEMMs and the Gram matrix), then
  ``sqrt(||W0_n||^2 + B_n . C_n)`` per row: ``W0 + s B A`` is never formed. The scale ``g = m / norm`` rides the
  expand GEMM's epilogue; the dropout form adds a second cuBLAS GEMM on ``x`` with its dropped entries zeroed.
- Multi-adapter: per-row gather shrink and expand kernels around cuBLAS (``csrc/multi_lora.cu``).

Every call hands raw device pointers, int64 strides and the current stream to the extension, on the tensors'
device. Launchers check what the extension would misread (shapes, dtypes, devices) and raise ValueError /
TypeError; float64 raises ``UnsupportedInputError``. The extension is imported on first use, never at import.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import UnsupportedInputError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/ops.h DTypeCode
MASK_NONE, MASK_A, MASK_B, MASK_C = 0, 1, 2, 3  # csrc/ops.h MaskOn: the GEMM operand that carries x's dropout mask


@functools.cache
def extension():
    """The compiled module ``lowrank_kernels._C`` (ImportError if it was not built or does not load)."""
    return importlib.import_module("lowrank_kernels._C")


class _Runtime:
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


def _runtime(device: torch.device) -> _Runtime:
    """Every launcher gets its runtime here: the one seam tests/test_cuda_ext.py swaps for an emulation on CPU."""
    return _Runtime(device)


# ---- argument helpers ------------------------------------------------------------------------------------------


def _code(t: Tensor) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise UnsupportedInputError(f"CUDA extension kernels take float16/bfloat16/float32, got {t.dtype}")
    return code


def _check_inputs(dtype: torch.dtype, device: torch.device, **tensors: Tensor | None) -> None:
    """Every named tensor is on ``device`` and, floating, of ``dtype`` (float64 anywhere: UnsupportedInputError)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype == torch.float64 or dtype == torch.float64:
            raise UnsupportedInputError(f"CUDA extension kernels take float16/bfloat16/float32, {name} is float64")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")


def _check_xa(xa: Tensor, M: int, R: int) -> None:
    if xa.dtype != torch.float32 or tuple(xa.shape) != (M, R):
        raise ValueError(f"xa must be the forward's float32 [{M}, {R}], got {tuple(xa.shape)} {xa.dtype}")


def _vector(t: Tensor | None, n: int, name: str) -> Tensor | None:
    """``t[:n]`` as a contiguous float32 vector (what the kernels read), None stays None."""
    if t is None:
        return None
    if t.dim() != 1 or t.shape[0] < n:
        raise ValueError(f"{name} must be 1-D with at least {n} entries, got shape {tuple(t.shape)}")
    return t[:n].to(torch.float32).contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _keep_factor(p: float) -> float:
    """1 / (1 - p) in float32 arithmetic, as the reference's and the kernels' mask value."""
    one = torch.ones((), dtype=torch.float32)
    return (one / (one - torch.tensor(p, dtype=torch.float32))).item()


def _dropout(mask_on: int, p: float, seed: int, cols: int) -> dict:
    """The gemm keyword arguments of x's dropout mask (none when p == 0)."""
    if p == 0.0:
        return {}
    return dict(mask_on=mask_on, seed=int(seed) & 0xFFFFFFFF, p=float(p), mask_cols=cols)


def _gemm(
    rt: _Runtime,
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
        a=a.data_ptr(), a_dtype=_code(a), a_s0=a.stride(0), a_s1=a.stride(1),
        b=b.data_ptr(), b_dtype=_code(b), b_s0=b.stride(0), b_s1=b.stride(1),
        c=c.data_ptr(), c_dtype=_code(c), c_s0=c.stride(0), c_s1=c.stride(1),
        alpha=float(alpha), cin=_ptr(cin), cin_s0=0 if cin is None else cin.stride(0),
        cin_s1=0 if cin is None else cin.stride(1), beta=float(beta),
        k_scale=_ptr(k_scale), row_scale=_ptr(row_scale), col_scale=_ptr(col_scale), post_scale=_ptr(post_scale),
        bias=_ptr(bias), mask_on=mask_on, seed=seed, p=p, mask_cols=mask_cols,
    )  # fmt: skip


def _dropout_combine(rt: _Runtime, base: Tensor | None, src: Tensor, out: Tensor, *, scale_kept: bool, p: float,
                     seed: int) -> None:  # fmt: skip
    """out = base + drop(src) elementwise, [M, K] of one dtype (base None: out = src with dropped entries zeroed,
    scaled by 1/(1-p) only with ``scale_kept``)."""
    M, K = src.shape
    for t in (base, out):
        if t is not None and (tuple(t.shape) != (M, K) or t.dtype != src.dtype):
            raise ValueError(f"dropout_combine operands must all be [{M}, {K}] {src.dtype}")
    rt(
        "dropout_combine",
        dtype=_code(src), M=M, K=K,
        base=_ptr(base), base_s0=0 if base is None else base.stride(0), base_s1=0 if base is None else base.stride(1),
        src=src.data_ptr(), src_s0=src.stride(0), src_s1=src.stride(1),
        out=out.data_ptr(), out_s0=out.stride(0), out_s1=out.stride(1),
        scale_kept=scale_kept, seed=int(seed) & 0xFFFFFFFF, p=float(p),
    )  # fmt: skip


def _col_dot(rt: _Runtime, p: Tensor, q: Tensor, shift: Tensor | None = None) -> Tensor:
    """[N] float32 = sum over rows of p * (q - shift); p, q: [M, N] of one dtype, shift: float32 [N] | None."""
    M, N = p.shape
    if tuple(q.shape) != (M, N) or q.dtype != p.dtype:
        raise ValueError(f"col_dot operands must match: {tuple(p.shape)} {p.dtype} vs {tuple(q.shape)} {q.dtype}")
    if shift is not None and (shift.dtype != torch.float32 or tuple(shift.shape) != (N,) or shift.stride(0) != 1):
        raise ValueError(f"col_dot shift must be a contiguous float32 [{N}]")
    out = torch.empty(N, device=p.device, dtype=torch.float32)
    rt("col_dot", dtype=_code(p), M=M, N=N, p=p.data_ptr(), p_s0=p.stride(0), p_s1=p.stride(1), q=q.data_ptr(),
       q_s0=q.stride(0), q_s1=q.stride(1), shift=_ptr(shift), out=out.data_ptr())  # fmt: skip
    return out


# ---- LoRA ------------------------------------------------------------------------------------------------------


def lora_forward(x, weight, bias, lora_A, lora_B, rank_scale, scale, rank, dropout_p, seed,
                 ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """x: [M, K] -> (y [M, N] in x's dtype, xa [M, R] float32 = drop(x) A[:rank]^T, zero past rank).

    Interface and math: ``reference.lora.lora_forward``. Three launches: the shrink, cuBLAS ``x W0^T + bias``, the
    in-place expand ``y += scale (xa * v) B[:, :rank]^T``.
    """
    _check_inputs(x.dtype, x.device, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, rank_scale=rank_scale)
    rt = _runtime(x.device)
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    _gemm(rt, x, lora_A[:rank].t(), xa[:, :rank], **_dropout(MASK_A, dropout_p, seed, K))
    y = F.linear(x, weight, bias)
    _gemm(rt, xa[:, :rank], lora_B[:, :rank].t(), y, alpha=scale, cin=y, beta=1.0,
          k_scale=_vector(rank_scale, rank, "rank_scale"))  # fmt: skip
    return y, xa


def lora_backward(grad_out, x, weight, lora_A, lora_B, rank_scale, xa, scale, rank, grad_rank_start, dropout_p, seed,
                  needs_dx=True, needs_dAB=True):  # fmt: skip
    """Returns (dx [M, K], dA [R, K], dB [N, R], dv [R] | None); dx / dA, dB empty [0] when not needed.

    Interface and math: ``reference.lora.lora_backward``.
    """
    dy = grad_out
    _check_inputs(x.dtype, x.device, grad_out=dy, weight=weight, lora_A=lora_A, lora_B=lora_B, rank_scale=rank_scale)
    _check_xa(xa, x.shape[0], lora_A.shape[0])
    rt = _runtime(x.device)
    M, K = x.shape
    v = _vector(rank_scale, rank, "rank_scale")
    lo = grad_rank_start
    drop_b = _dropout(MASK_B, dropout_p, seed, K)
    dyb = torch.empty(M, rank, device=x.device, dtype=torch.float32)
    _gemm(rt, dy, lora_B[:, :rank], dyb)  # dy B[:, :rank]
    dx = x.new_empty(0)
    if needs_dx:
        dx = torch.mm(dy, weight)  # cuBLAS; the low-rank term (masked by drop') is added in place
        _gemm(rt, dyb, lora_A[:rank], dx, alpha=scale, cin=dx, beta=1.0, k_scale=v,
              **_dropout(MASK_C, dropout_p, seed, K))  # fmt: skip
    dA, dB = x.new_empty(0), x.new_empty(0)  # distinct tensors: custom-op outputs may not alias
    if needs_dAB:
        dA = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
        dB = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
        v_lo = None if v is None else v[lo:]
        if lo < rank:
            # dA[lo:b] = s (dyb * v)[:, lo:b]^T drop(x); dB[:, lo:b] = s dy^T (xa * v)[:, lo:b]
            _gemm(rt, dyb[:, lo:].t(), x, dA[lo:rank], alpha=scale, row_scale=v_lo, **drop_b)
            _gemm(rt, dy.t(), xa[:, lo:rank], dB[:, lo:rank], alpha=scale, col_scale=v_lo)
    dv = None
    if rank_scale is not None:
        dv = torch.zeros_like(rank_scale)
        if lo < rank:
            dv[lo:rank] = (scale * _col_dot(rt, xa[:, lo:rank], dyb[:, lo:])).to(rank_scale.dtype)
    return dx, dA, dB, dv


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device) -> Tensor:
    """The mask (0 or 1/(1-p), float32 [M, K]) that these kernels apply for ``seed`` (for tests)."""
    M, K = shape
    device = torch.device(device)
    out = torch.empty(M, K, device=device, dtype=torch.float32)
    rt = _runtime(device)
    rt("dropout_mask", M=M, K=K, out=out.data_ptr(), out_s0=out.stride(0), out_s1=out.stride(1),
       seed=int(seed) & 0xFFFFFFFF, p=float(p))  # fmt: skip
    return out


# ---- DoRA ------------------------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A, lora_B, weight_norm_sq, scale, rank) -> Tensor:
    """[N] float32 = ||W0 + scale B[:, :rank] A[:rank]||_row, factored (interface: ``reference.dora``).

    weight_norm_sq: [N] float32 ``||W0_n||^2`` | None (then summed from W0 by the finishing kernel).
    """
    _check_inputs(weight.dtype, weight.device, lora_A=lora_A, lora_B=lora_B)
    rt = _runtime(weight.device)
    N, K = weight.shape
    A, B = lora_A[:rank], lora_B[:, :rank]
    c = torch.empty(N, rank, device=weight.device, dtype=torch.float32)
    _gemm(rt, weight, A.t(), c, alpha=2.0 * scale)  # 2s W0 A^T
    gram = torch.empty(rank, rank, device=weight.device, dtype=torch.float32)
    _gemm(rt, A, A.t(), gram)  # G = A A^T
    _gemm(rt, B, gram, c, alpha=scale * scale, cin=c, beta=1.0)  # + s^2 B G
    w0sq = _vector(weight_norm_sq, N, "weight_norm_sq")
    norm = torch.empty(N, device=weight.device, dtype=torch.float32)
    rt("dora_norm_finish", dtype=_code(weight), N=N, K=K, rank=rank, w=weight.data_ptr(), w_s0=weight.stride(0),
       w_s1=weight.stride(1), w0sq=_ptr(w0sq), b=B.data_ptr(), b_s0=B.stride(0), b_s1=B.stride(1),
       c=c.data_ptr(), c_s0=c.stride(0), c_s1=c.stride(1), out=norm.data_ptr())  # fmt: skip
    return norm


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, rank, dropout_p, seed,
                 ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """x: [M, K] -> (y [M, N], xa [M, R] float32, z [M, N] with dropout / empty [0] without); see ``reference.dora``.

    Without dropout: the shrink, cuBLAS ``x W0^T``, then one expand GEMM whose epilogue applies g and the bias.
    With dropout (peft's form): ``xd`` = x with its dropped entries zeroed, cuBLAS ``x W0^T + bias`` and
    ``xd W0^T``, ``z = xd W0^T / (1 - p) + s xa B^T`` by the expand GEMM, and
    ``y = x W0^T + bias + g z - drop(x) W0^T`` elementwise.
    """
    _check_inputs(x.dtype, x.device, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude)
    if weight_norm.device != x.device:
        raise ValueError(f"weight_norm is on {weight_norm.device}, expected {x.device}")
    rt = _runtime(x.device)
    M, K = x.shape
    N, R = lora_B.shape
    g = (magnitude.float() / weight_norm.float()).contiguous()  # [N] float32, IEEE: g == 1 exactly when m == norm
    xa = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    _gemm(rt, x, lora_A[:rank].t(), xa[:, :rank], **_dropout(MASK_A, dropout_p, seed, K))
    up = lora_B[:, :rank].t()
    if dropout_p == 0.0:
        y = F.linear(x, weight)
        _gemm(rt, xa[:, :rank], up, y, alpha=scale, cin=y, beta=1.0, post_scale=g, bias=_vector(bias, N, "bias"))
        return y, xa, x.new_empty(0)
    keep = _keep_factor(dropout_p)
    xd = torch.empty(M, K, device=x.device, dtype=x.dtype)
    _dropout_combine(rt, None, x, xd, scale_kept=False, p=dropout_p, seed=seed)
    y = F.linear(x, weight, bias)
    dz = F.linear(xd, weight)  # drop(x) W0^T * (1 - p)
    z = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemm(rt, xa[:, :rank], up, z, alpha=scale, cin=dz, beta=keep)
    rt("dora_dropout_output", dtype=_code(x), M=M, N=N, base=y.data_ptr(), base_s0=y.stride(0), base_s1=y.stride(1),
       z=z.data_ptr(), z_s0=z.stride(0), z_s1=z.stride(1), dz=dz.data_ptr(), dz_s0=dz.stride(0),
       dz_s1=dz.stride(1), dz_scale=keep, g=g.data_ptr(), out=y.data_ptr(), out_s0=y.stride(0),
       out_s1=y.stride(1))  # fmt: skip
    return y, xa, z


def dora_backward(grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, saved, scale, rank,
                  grad_rank_start, dropout_p, seed, needs_dx=True, needs_dAB=True, needs_dm=True):  # fmt: skip
    """Returns (dx [M, K], dA [R, K], dB [N, R], dm [N]), each empty [0] unless needed; see ``reference.dora``.

    g enters the shrink ``dyb = (dy * g) B`` as the GEMM's per-k scale and dB as its per-row scale; dx's dense part
    is cuBLAS on ``dy * g`` (with dropout ``dy`` and ``dy * (g - 1)``), the low-rank part our GEMM.
    """
    dy = grad_out
    _check_inputs(x.dtype, x.device, grad_out=dy, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B,
                  magnitude=magnitude, saved=saved)  # fmt: skip
    _check_xa(xa, x.shape[0], lora_A.shape[0])
    rt = _runtime(x.device)
    M, K = x.shape
    lo = grad_rank_start
    g = (magnitude.float() / weight_norm.float()).contiguous()  # [N]
    dx, dA, dB, dm = (x.new_empty(0) for _ in range(4))  # distinct tensors: custom-op outputs may not alias
    if needs_dx or needs_dAB:
        dyb = torch.empty(M, rank, device=x.device, dtype=torch.float32)
        _gemm(rt, dy, lora_B[:, :rank], dyb, k_scale=g)  # (dy * g) B[:, :rank]
    if needs_dx:
        A = lora_A[:rank]
        if dropout_p == 0.0:  # dx = (dy * g) W0 + s dyb A
            dx = torch.mm((dy.float() * g).to(dy.dtype), weight)
            _gemm(rt, dyb, A, dx, alpha=scale, cin=dx, beta=1.0)
        else:  # dx = dy W0 + drop'((dy * (g - 1)) W0 + s dyb A)
            dx = torch.mm(dy, weight)
            inner = torch.mm((dy.float() * (g - 1.0)).to(dy.dtype), weight)
            _gemm(rt, dyb, A, inner, alpha=scale, cin=inner, beta=1.0)
            _dropout_combine(rt, dx, inner, dx, scale_kept=True, p=dropout_p, seed=seed)
    if needs_dAB:  # LoRA's dA and dB of the upstream gradient dy * g
        dA = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
        dB = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
        if lo < rank:
            _gemm(rt, dyb[:, lo:].t(), x, dA[lo:rank], alpha=scale, **_dropout(MASK_B, dropout_p, seed, K))
            _gemm(rt, dy.t(), xa[:, lo:rank], dB[:, lo:rank], alpha=scale, row_scale=g)
    if needs_dm:
        if dropout_p == 0.0:  # saved = y; z = (y - bias) / g, so sum(dy z) / norm = sum(dy (y - bias)) / m
            total = _col_dot(rt, dy, saved, _vector(bias, weight.shape[0], "bias"))
            m = magnitude.float()
            dm = torch.where(m != 0, total / m, torch.zeros_like(total))
        else:  # saved = z
            dm = _col_dot(rt, dy, saved) / weight_norm.float()
        dm = dm.to(magnitude.dtype)
    return dx, dA, dB, dm


# ---- multi-adapter ---------------------------------------------------------------------------------------------


def _check_metadata(M: int, device: torch.device, **tensors: tuple[Tensor, torch.dtype, int]) -> None:
    for name, (t, dtype, n) in tensors.items():
        if t.dtype != dtype or t.dim() != 1 or t.shape[0] != n or t.stride(0) != 1 or t.device != device:
            raise ValueError(f"{name} must be a contiguous {dtype} [{n}] on {device}, got {tuple(t.shape)} "
                             f"{t.dtype} (stride {tuple(t.stride())}) on {t.device}")  # fmt: skip


def multi_lora_forward(x, weight, bias, lora_A, lora_B, magnitude_scale, dora_slots, row_slot, row_rank, row_scale,
                       sorted_rows, tiles, block_m) -> Tensor:  # fmt: skip
    """x: [M, K] -> y [M, N] in x's dtype (interface: ``reference.multi_lora.multi_lora_forward``).

    lora_A: [n, R, K], lora_B: [n, N, R] (the pool; any strides), magnitude_scale: [n, N] float32; the per-row
    metadata row_slot / row_rank (int32) and row_scale (float32) drive the kernels, one row at a time; the
    batch's sorted_rows / tiles / block_m (the Triton kernels' grouping) are not used here.
    """
    _check_inputs(x.dtype, x.device, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    M, K = x.shape
    n_slots, R, K_pool = lora_A.shape
    N = weight.shape[0]
    if K_pool != K or tuple(lora_B.shape) != (n_slots, N, R):
        raise ValueError(f"pool shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} do not fit x [{M}, {K}], N={N}")
    if magnitude_scale.dtype != torch.float32 or tuple(magnitude_scale.shape) != (n_slots, N):
        raise ValueError(f"magnitude_scale must be float32 [{n_slots}, {N}], got {tuple(magnitude_scale.shape)} "
                         f"{magnitude_scale.dtype}")  # fmt: skip
    _check_metadata(M, x.device, row_slot=(row_slot, torch.int32, M), row_rank=(row_rank, torch.int32, M),
                    row_scale=(row_scale, torch.float32, M), dora_slots=(dora_slots, torch.int32, n_slots))  # fmt: skip
    rt = _runtime(x.device)
    y = F.linear(x, weight, bias)
    if M == 0 or n_slots == 0 or R == 0:
        return y
    t = torch.empty(M, R, device=x.device, dtype=torch.float32)  # rows without adapter: never written, never read
    code = _code(x)
    rt("multi_lora_shrink", dtype=code, M=M, K=K, capacity=n_slots, max_rank=R, x=x.data_ptr(), x_s0=x.stride(0),
       x_s1=x.stride(1), a=lora_A.data_ptr(), a_s0=lora_A.stride(0), a_s1=lora_A.stride(1), a_s2=lora_A.stride(2),
       row_slot=row_slot.data_ptr(), row_rank=row_rank.data_ptr(), row_scale=row_scale.data_ptr(), t=t.data_ptr(),
       t_s0=t.stride(0), t_s1=t.stride(1))  # fmt: skip
    bias32 = _vector(bias, N, "bias")
    rt("multi_lora_expand", dtype=code, M=M, N=N, capacity=n_slots, max_rank=R, t=t.data_ptr(), t_s0=t.stride(0),
       t_s1=t.stride(1), b=lora_B.data_ptr(), b_s0=lora_B.stride(0), b_s1=lora_B.stride(1), b_s2=lora_B.stride(2),
       row_slot=row_slot.data_ptr(), row_rank=row_rank.data_ptr(), dora_slots=dora_slots.data_ptr(),
       g=magnitude_scale.data_ptr(), g_s0=magnitude_scale.stride(0), g_s1=magnitude_scale.stride(1),
       bias=_ptr(bias32), y=y.data_ptr(), y_s0=y.stride(0), y_s1=y.stride(1))  # fmt: skip
    return y
