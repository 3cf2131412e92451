"""The CUDA C++ backend (csrc/, lowrank_kernels._C, launched by lowrank_kernels.kernels.cuda_ext).

Without a GPU (CI): the extension builds and imports, its bindings take exactly the keyword arguments the
launchers pass and reject bad ones, dispatch reports why the backend cannot run, float64 is refused clearly.
The launchers themselves run end to end on the CPU against an emulated extension (``EmulatedRuntime``: the
semantics ``csrc/ops.h`` documents, written in PyTorch on the tensors' memory), through the same op tests as the
other backends: every slice, stride, scale and mask the launchers hand the kernels is checked against the oracle.
On a GPU the real kernels run the whole op suite (``helpers.kernel_backends`` includes "cuda" there) plus the
GPU-marked cases at the bottom; ``scripts/gpu_run.sh`` also runs a selection under compute-sanitizer.
"""

import ctypes
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import test_dora
import test_lora_ops
import test_multi_lora
import torch
from helpers import DEVICE, HAS_CUDA, REL_TOL, make_lora_inputs, rel_err

from lowrank_kernels import (
    AdapterBatch,
    AdapterPool,
    BackendUnavailableError,
    available_backends,
    lora_linear,
    use_backend,
)
from lowrank_kernels import backend as backend_mod
from lowrank_kernels.kernels import cuda_ext
from lowrank_kernels.ops.dora.op import dora_linear
from lowrank_kernels.ops.lora.naive import dropout_mask
from lowrank_kernels.ops.multi_lora.naive import multi_lora_forward as multi_lora_reference
from lowrank_kernels.ops.multi_lora.op import multi_lora_linear


def _extension_or_none():
    try:
        return importlib.import_module("lowrank_kernels._C")
    except ImportError:
        return None


EXT = _extension_or_none()
NVCC = os.environ.get("LOWRANK_KERNELS_SKIP_CUDA_BUILD") != "1" and bool(
    shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc")
)
needs_ext = pytest.mark.skipif(EXT is None, reason="lowrank_kernels._C is not built (no nvcc at install time?)")
needs_gpu_ext = pytest.mark.skipif(not (HAS_CUDA and EXT is not None), reason="needs a CUDA GPU and the extension")

BINDINGS = ("gemm", "dropout_mask", "dropout_combine", "dora_dropout_output", "col_dot", "dora_norm_finish",
            "multi_lora_shrink", "multi_lora_expand")  # fmt: skip
# The size argument that, set to 0, makes each binding return after its checks without touching the GPU.
EMPTY_SIZE = {"gemm": "M", "dropout_mask": "M", "dropout_combine": "M", "dora_dropout_output": "M", "col_dot": "N",
              "dora_norm_finish": "N", "multi_lora_shrink": "M", "multi_lora_expand": "M"}  # fmt: skip


# ---- the extension: built, importable without a GPU, bindings and their own checks ---------------------------------


def test_extension_is_built_where_nvcc_is():
    """CI has nvcc: the install must have built and loaded the extension (a stale or broken build fails here)."""
    if EXT is None and not NVCC:
        pytest.skip("no nvcc here and no prebuilt extension")
    assert EXT is not None, f"lowrank_kernels._C does not import: {backend_mod._import_error('lowrank_kernels._C')}"
    for name in BINDINGS:
        assert callable(getattr(EXT, name)), name
    assert (EXT.DTYPE_FLOAT32, EXT.DTYPE_FLOAT16, EXT.DTYPE_BFLOAT16) == tuple(cuda_ext.DTYPE_CODES.values())
    assert (EXT.MASK_NONE, EXT.MASK_A, EXT.MASK_B, EXT.MASK_C) == (
        cuda_ext.MASK_NONE,
        cuda_ext.MASK_A,
        cuda_ext.MASK_B,
        cuda_ext.MASK_C,
    )


def _gemm_kwargs(**overrides):
    kw = dict(M=0, N=4, K=4, a=0, a_dtype=0, a_s0=4, a_s1=1, b=0, b_dtype=0, b_s0=4, b_s1=1, c=0, c_dtype=0, c_s0=4,
              c_s1=1, alpha=1.0, cin=0, cin_s0=0, cin_s1=0, beta=0.0, k_scale=0, row_scale=0, col_scale=0,
              post_scale=0, bias=0, mask_on=0, seed=0, p=0.0, mask_cols=0, stream=0)  # fmt: skip
    return kw | overrides


@needs_ext
def test_bindings_check_their_arguments_before_any_launch():
    """The C++ checks run before any CUDA call, so they are testable here; they raise ValueError with the reason."""
    EXT.gemm(**_gemm_kwargs())  # an empty product: nothing to launch, no error
    with pytest.raises(ValueError, match="negative size"):
        EXT.gemm(**_gemm_kwargs(M=-1))
    with pytest.raises(ValueError, match="operands mix float16 and bfloat16"):
        EXT.gemm(**_gemm_kwargs(M=1, a=8, b=8, c=8, a_dtype=1, b_dtype=2))
    with pytest.raises(ValueError, match="unsupported operand dtypes"):
        EXT.gemm(**_gemm_kwargs(M=1, a=8, b=8, c=8, a_dtype=1, b_dtype=1, c_dtype=1))  # (T, T, T): no kernel
    with pytest.raises(ValueError, match="bad dtype code 7"):
        EXT.gemm(**_gemm_kwargs(M=1, a=8, b=8, c=8, a_dtype=7))
    with pytest.raises(ValueError, match="beta != 0 needs cin"):
        EXT.gemm(**_gemm_kwargs(beta=1.0))
    with pytest.raises(ValueError, match="dropout needs"):
        EXT.gemm(**_gemm_kwargs(mask_on=1, p=1.0, mask_cols=4))
    with pytest.raises(ValueError, match="N too large"):
        EXT.gemm(**_gemm_kwargs(N=2**23))
    with pytest.raises(ValueError, match="null operand"):
        EXT.gemm(**_gemm_kwargs(M=1))
    with pytest.raises(ValueError, match="0 <= p < 1"):
        EXT.dropout_mask(M=2, K=2, out=0, out_s0=2, out_s1=1, seed=0, p=1.0, stream=0)
    with pytest.raises(ValueError, match="unsupported dtype code 3"):
        EXT.col_dot(dtype=3, M=1, N=1, p=8, p_s0=1, p_s1=1, q=8, q_s0=1, q_s1=1, shift=0, out=8, stream=0)
    with pytest.raises(TypeError):  # pybind11: a wrong keyword never reaches C++
        EXT.gemm(**_gemm_kwargs(alpah=1.0))


def test_importing_the_launchers_loads_no_extension():
    """cuda_ext loads lowrank_kernels._C on first use only: importing the package and the ops never needs it."""
    code = ("import sys, lowrank_kernels, lowrank_kernels.ops, lowrank_kernels.kernels.cuda_ext; "
            "sys.exit('lowrank_kernels._C' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---- dispatch: why the backend cannot run, and float64 -----------------------------------------------------------


def test_cpu_tensors_exclude_the_cuda_backend():
    assert "cuda" not in available_backends("cpu")
    assert backend_mod.availability("cuda", torch.device("cpu")) == "the CUDA extension needs CUDA tensors (got cpu)"


@pytest.mark.parametrize("op", ["lora", "dora", "multi"])
def test_requested_cuda_on_cpu_tensors_raises_with_the_reason(op):
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device="cpu")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="'cuda' was requested.*needs CUDA tensors"):
        if op == "lora":
            lora_linear(x, weight, bias, A, B, scale=1.0)
        elif op == "dora":
            dora_linear(x, weight, bias, A, B, torch.ones(8), scale=1.0)
        else:
            pool = AdapterPool(16, 8, 2, 2)
            pool.add("a", A, B, alpha=2.0)
            multi_lora_linear(x, weight, bias, pool, AdapterBatch.build(pool, [0, -1, 0]))


def test_requested_cuda_refuses_float64(monkeypatch):
    """float64 is not a kernel dtype: asked for by name the call says so; called directly the launcher raises
    UnsupportedInputError (which an automatic choice skips)."""
    monkeypatch.setattr(backend_mod, "availability", lambda name, device: None)
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float64, device="cpu")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CUDA extension kernels take float16/bf"):
        lora_linear(x, weight, bias, A, B, scale=1.0)
    with pytest.raises(backend_mod.UnsupportedInputError, match="float64"):
        cuda_ext.lora_forward(x, weight, bias, A, B, None, 1.0, 2, 0.0, 0)


def test_launchers_check_their_arguments():
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_ext.lora_forward(x, weight, bias, A, B, None, 1.0, 2, 0.0, 0)
    with pytest.raises(TypeError, match="lora_A has dtype torch.float16"):
        cuda_ext.lora_forward(x, weight, bias, A.half(), B, None, 1.0, 2, 0.0, 0)
    with pytest.raises(ValueError, match="xa must be the forward's float32"):
        cuda_ext.lora_backward(x[:, :8], x, weight, A, B, None, torch.zeros(3, 2, dtype=torch.float16), 1.0, 2, 0,
                               0.0, 0)  # fmt: skip
    rt = EmulatedRuntime(torch.device("cpu"))
    with pytest.raises(ValueError, match="do not chain"):
        cuda_ext._gemm(rt, x, A, torch.empty(3, 2))
    with pytest.raises(ValueError, match="k_scale must be a contiguous float32"):
        cuda_ext._gemm(rt, x, A.t(), torch.empty(3, 2), k_scale=torch.ones(16, dtype=torch.float16))
    with pytest.raises(ValueError, match="beta != 0 needs cin"):
        cuda_ext._gemm(rt, x, A.t(), torch.empty(3, 2), beta=1.0)
    with pytest.raises(ValueError, match="dropout needs"):
        cuda_ext._gemm(rt, x, A.t(), torch.empty(3, 2), mask_on=cuda_ext.MASK_A, p=0.5)


# ---- the launchers end to end on the CPU, against an emulated extension ------------------------------------------

_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def _view(ptr: int, dtype: torch.dtype, shape: tuple, strides: tuple) -> torch.Tensor:
    """The strided tensor at address ``ptr`` (memory shared: writes land in the launcher's tensor)."""
    if any(n == 0 for n in shape):
        return torch.empty(shape, dtype=dtype)
    assert ptr != 0 and all(s >= 0 for s in strides)
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    buffer = (ctypes.c_char * (extent * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(buffer, dtype=dtype, count=extent).as_strided(shape, strides)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)  # the kernels take alpha, beta and p as float32


class EmulatedRuntime:
    """Stands in for ``cuda_ext._Runtime`` on CPU tensors: each binding's documented semantics (csrc/ops.h) in
    PyTorch, on the memory behind the raw pointers. Every call is also made on the real binding, when built, with
    its size set to 0 (checks only, no launch): the launchers' keyword arguments must match the C++ signatures."""

    def __init__(self, device: torch.device) -> None:
        assert device.type == "cpu"
        self.device = device
        self.calls: list[str] = []

    def __call__(self, fn: str, **kw) -> None:
        self.calls.append(fn)
        if EXT is not None:
            getattr(EXT, fn)(**{**kw, EMPTY_SIZE[fn]: 0, "stream": 0})
        getattr(self, fn)(**kw)

    @staticmethod
    def _keep(seed, p, rows, cols, mask_cols):
        assert cols == mask_cols, "the mask is x's: the masked operand must have x's column count"
        return dropout_mask(seed, (rows, mask_cols), p) != 0

    @staticmethod
    def _vec(ptr, n):
        return None if ptr == 0 else _view(ptr, torch.float32, (n,), (1,))

    def gemm(self, M, N, K, a, a_dtype, a_s0, a_s1, b, b_dtype, b_s0, b_s1, c, c_dtype, c_s0, c_s1, alpha, cin,
             cin_s0, cin_s1, beta, k_scale, row_scale, col_scale, post_scale, bias, mask_on, seed, p,
             mask_cols):  # fmt: skip
        if M == 0 or N == 0:
            return
        A = _view(a, _DTYPES[a_dtype], (M, K), (a_s0, a_s1)).float()
        B = _view(b, _DTYPES[b_dtype], (K, N), (b_s0, b_s1)).float()
        inv = 1 / (1 - _f32(p))
        if mask_on == 1:
            A = torch.where(self._keep(seed, p, M, K, mask_cols), A, 0.0)
        if mask_on == 2:
            B = torch.where(self._keep(seed, p, K, N, mask_cols), B, 0.0)
        if k_scale:
            A = A * self._vec(k_scale, K)
        v = _f32(alpha) * (A @ B)
        if mask_on in (1, 2):
            v = v * inv
        if row_scale:
            v = v * self._vec(row_scale, M)[:, None]
        if col_scale:
            v = v * self._vec(col_scale, N)
        if mask_on == 3:
            v = torch.where(self._keep(seed, p, M, N, mask_cols), v * inv, 0.0)
        if beta != 0.0:
            v = v + _f32(beta) * _view(cin, _DTYPES[c_dtype], (M, N), (cin_s0, cin_s1)).float()
        if post_scale:
            v = v * self._vec(post_scale, N)
        if bias:
            v = v + self._vec(bias, N)
        _view(c, _DTYPES[c_dtype], (M, N), (c_s0, c_s1)).copy_(v)

    def dropout_mask(self, M, K, out, out_s0, out_s1, seed, p):
        _view(out, torch.float32, (M, K), (out_s0, out_s1)).copy_(dropout_mask(seed, (M, K), p))

    def dropout_combine(self, dtype, M, K, base, base_s0, base_s1, src, src_s0, src_s1, out, out_s0, out_s1,
                        scale_kept, seed, p):  # fmt: skip
        t = _DTYPES[dtype]
        factor = (1 / (1 - _f32(p))) if scale_kept else _f32(1.0)
        kept = torch.where(self._keep(seed, p, M, K, K), _view(src, t, (M, K), (src_s0, src_s1)).float() * factor, 0)
        if base:
            kept = _view(base, t, (M, K), (base_s0, base_s1)).float() + kept
        _view(out, t, (M, K), (out_s0, out_s1)).copy_(kept)

    def dora_dropout_output(self, dtype, M, N, base, base_s0, base_s1, z, z_s0, z_s1, dz, dz_s0, dz_s1, dz_scale, g,
                            out, out_s0, out_s1):  # fmt: skip
        t = _DTYPES[dtype]
        v = (_view(base, t, (M, N), (base_s0, base_s1)).float() + self._vec(g, N) * _view(z, t, (M, N), (z_s0, z_s1))
             - _f32(dz_scale) * _view(dz, t, (M, N), (dz_s0, dz_s1)).float())  # fmt: skip
        _view(out, t, (M, N), (out_s0, out_s1)).copy_(v)

    def col_dot(self, dtype, M, N, p, p_s0, p_s1, q, q_s0, q_s1, shift, out):
        t = _DTYPES[dtype]
        Q = _view(q, t, (M, N), (q_s0, q_s1)).float()
        if shift:
            Q = Q - self._vec(shift, N)
        _view(out, torch.float32, (N,), (1,)).copy_((_view(p, t, (M, N), (p_s0, p_s1)).float() * Q).sum(0))

    def dora_norm_finish(self, dtype, N, K, rank, w, w_s0, w_s1, w0sq, b, b_s0, b_s1, c, c_s0, c_s1, out):
        t = _DTYPES[dtype]
        W = _view(w, t, (N, K), (w_s0, w_s1))
        # Row by row: no [N, K] temporary (test_no_weight_sized_temporary watches this code too).
        sq = self._vec(w0sq, N) if w0sq else torch.stack([row.float().dot(row.float()) for row in W])
        cross = (_view(b, t, (N, rank), (b_s0, b_s1)).float() * _view(c, torch.float32, (N, rank), (c_s0, c_s1))).sum(1)
        _view(out, torch.float32, (N,), (1,)).copy_((sq + cross).clamp_min(0).sqrt())

    @staticmethod
    def _rows(M, capacity, max_rank, row_slot, row_rank):
        """(row, slot, rank) of every row the kernels serve: slot in [0, capacity), rank clamped to [0, max_rank]."""
        slots = _view(row_slot, torch.int32, (M,), (1,)).tolist()
        ranks = _view(row_rank, torch.int32, (M,), (1,)).tolist()
        return [(m, s, min(max(r, 0), max_rank)) for m, (s, r) in enumerate(zip(slots, ranks, strict=True))
                if 0 <= s < capacity]  # fmt: skip

    def multi_lora_shrink(self, dtype, M, K, capacity, max_rank, x, x_s0, x_s1, a, a_s0, a_s1, a_s2, row_slot,
                          row_rank, row_scale, t, t_s0, t_s1):  # fmt: skip
        X = _view(x, _DTYPES[dtype], (M, K), (x_s0, x_s1)).float()
        A = _view(a, _DTYPES[dtype], (capacity, max_rank, K), (a_s0, a_s1, a_s2)).float()
        T = _view(t, torch.float32, (M, max_rank), (t_s0, t_s1))
        scales = self._vec(row_scale, M)
        for m, s, r in self._rows(M, capacity, max_rank, row_slot, row_rank):
            T[m, :r] = scales[m] * (A[s, :r] @ X[m])

    def multi_lora_expand(self, dtype, M, N, capacity, max_rank, t, t_s0, t_s1, b, b_s0, b_s1, b_s2, row_slot,
                          row_rank, dora_slots, g, g_s0, g_s1, bias, y, y_s0, y_s1):  # fmt: skip
        T = _view(t, torch.float32, (M, max_rank), (t_s0, t_s1))
        B = _view(b, _DTYPES[dtype], (capacity, N, max_rank), (b_s0, b_s1, b_s2)).float()
        G = _view(g, torch.float32, (capacity, N), (g_s0, g_s1))
        dora = _view(dora_slots, torch.int32, (capacity,), (1,))
        Y = _view(y, _DTYPES[dtype], (M, N), (y_s0, y_s1))
        bias_v = self._vec(bias, N) if bias else torch.zeros(N)
        for m, s, r in self._rows(M, capacity, max_rank, row_slot, row_rank):
            low = B[s, :, :r] @ T[m, :r]
            v = Y[m].float()
            Y[m] = G[s] * (v - bias_v + low) + bias_v if dora[s] != 0 else v + low


@pytest.fixture
def emulated(monkeypatch):
    """The cuda backend on CPU tensors, its launchers running on ``EmulatedRuntime``; yields the runtimes made."""
    made = []

    def runtime(device):
        made.append(EmulatedRuntime(device))
        return made[-1]

    real = backend_mod.availability
    allow_cuda = lambda name, device: None if name == "cuda" else real(name, device)
    monkeypatch.setattr(backend_mod, "availability", allow_cuda)
    monkeypatch.setattr(cuda_ext, "_runtime", runtime)
    return made


EMULATED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("M, K, N, R, b", test_lora_ops.SHAPES)
def test_emulated_lora(emulated, dtype, M, K, N, R, b, poison_empty):
    test_lora_ops.run_and_check("cuda", dtype, M, K, N, R, b)
    assert {"gemm", "col_dot"} >= {fn for rt in emulated for fn in rt.calls} >= {"gemm"}


@pytest.mark.parametrize("M, b", [pytest.param(5, 3, id="decode-M5"), pytest.param(70, 6, id="prefill-M70")])
@pytest.mark.parametrize("variant", test_lora_ops.VARIANTS)
def test_emulated_lora_variants(emulated, M, b, variant, poison_empty):
    test_lora_ops.run_and_check("cuda", torch.float32, M, 37, 29, 8, b, **variant)


@pytest.mark.parametrize("M", [5, 70])
def test_emulated_lora_strided_input(emulated, M, poison_empty):
    test_lora_ops.test_strided_input("cuda", torch.float16, None, M, None)


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("M, K, N, R, b", test_dora.SHAPES)
def test_emulated_dora(emulated, dtype, M, K, N, R, b, poison_empty):
    test_dora.run_and_check("cuda", dtype, M, K, N, R, b)


@pytest.mark.parametrize("M, b", [pytest.param(5, 3, id="decode-M5"), pytest.param(70, 6, id="prefill-M70")])
@pytest.mark.parametrize("variant", test_dora.VARIANTS)
def test_emulated_dora_variants(emulated, M, b, variant, poison_empty):
    test_dora.run_and_check("cuda", torch.float32, M, 37, 29, 8, b, **variant)


@pytest.mark.parametrize("with_cache", [False, True], ids=["computed-w0sq", "cached-w0sq"])
@pytest.mark.parametrize("R, b", [(8, 5), (160, 150)])
def test_emulated_dora_factored_norm(emulated, with_cache, R, b):
    test_dora.test_factored_norm_matches_the_direct_norm("cuda", with_cache, R, b)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_emulated_dora_norm_detached_and_no_weight_sized_temporary(emulated, dropout, monkeypatch):
    test_dora.test_norm_is_detached("cuda", dropout)
    test_dora.test_no_weight_sized_temporary("cuda", dropout, monkeypatch)


def test_emulated_dora_zero_magnitude_column(emulated):
    test_dora.test_zero_magnitude_column("cuda")


@pytest.mark.parametrize("dtype", EMULATED_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("mix", ["distinct", "zipf", "some-none"])
def test_emulated_multi_lora(emulated, dtype, mix, poison_empty):
    linear, pool, adapters = test_multi_lora.make_setup(dtype)
    test_multi_lora.check("cuda", dtype, linear, pool, adapters, test_multi_lora.adapter_mix(mix, 40, 5, seed=3))


def test_emulated_multi_lora_details(emulated):
    """Truncated ranks per row, two rank blocks, strided x, DoRA rows beside LoRA rows, 3-D prefill, rows without."""
    dtype = torch.float32
    test_multi_lora.test_truncated_ranks_per_row("cuda", dtype, None)
    test_multi_lora.test_ranks_past_one_rank_block_and_k_splits("cuda", dtype, None)
    test_multi_lora.test_strided_input("cuda", dtype)
    for bias in (True, False):
        test_multi_lora.test_dora_and_lora_in_one_batch("cuda", dtype, bias, None)
    test_multi_lora.test_prefill_3d_per_sequence_ids("cuda", dtype, None)
    test_multi_lora.test_rows_without_adapter_are_the_base_layer("cuda", dtype)


def _corrupt_batch_case(device, dtype):
    """A pool and per-row metadata no AdapterBatch would build: slots -5, capacity, 99; ranks above max_rank, < 0."""
    K, N, n, R = 40, 24, 3, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, K, generator=g).to(device, dtype)
    weight = (torch.randn(N, K, generator=g) * K**-0.5).to(device, dtype)
    bias = torch.randn(N, generator=g).to(device, dtype)
    A = (torch.randn(n, R, K, generator=g) * K**-0.5).to(device, dtype)
    B = (torch.randn(n, N, R, generator=g) * R**-0.5).to(device, dtype)
    gscale = (torch.rand(n, N, generator=g) + 0.5).to(device)
    dora = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    slot = torch.tensor([0, -5, 1, 3, 2, 99, 0], dtype=torch.int32, device=device)
    rank = torch.tensor([8, 4, 40, 2, -3, 5, 3], dtype=torch.int32, device=device)
    scale = torch.full((7,), 0.5, device=device)
    clamped = torch.where(slot.long().clamp(-1) >= n, -1, slot.clamp(-1)).to(torch.int32)  # what the kernels serve
    ranks_served = torch.where(clamped >= 0, rank.clamp(0, R), 0).to(torch.int32)
    args = (x, weight, bias, A, B, gscale, dora)
    return args, (slot, rank, scale), (clamped, ranks_served, scale)


def test_emulated_multi_lora_corrupt_metadata_stays_in_bounds(emulated):
    """Second line of defence: an id outside [0, capacity) is a row without adapter, a rank past R is R."""
    args, given, served = _corrupt_batch_case(torch.device("cpu"), torch.float32)
    y = cuda_ext.multi_lora_forward(*args, *given, None, None, 0)
    assert rel_err(y, multi_lora_reference(*args, *served)) < REL_TOL[torch.float32]


# ---- GPU: the real kernels -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu_ext
@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 - 1])
def test_gpu_dropout_mask_is_the_reference_bit_for_bit(seed):
    for shape, p in (((40, 64), 0.25), ((333, 777), 0.1), ((1, 4099), 0.5)):
        mask = cuda_ext.dropout_mask(seed, shape, p, "cuda")
        assert torch.equal(mask.cpu(), dropout_mask(seed, shape, p)), (shape, p)


@pytest.mark.gpu
@needs_gpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "M, K, N, R, b",
    [
        pytest.param(1, 4096, 4096, 16, 16, id="M1-4096x4096-r16"),
        pytest.param(16, 4096, 11008, 64, 8, id="M16-4096x11008-r64-b8"),
        pytest.param(2049, 4096, 11008, 64, 8, id="M2049-4096x11008-r64-b8"),
    ],
)
@pytest.mark.parametrize("variant", [{}, dict(dropout=0.1), dict(frozen=True)], ids=["plain", "dropout", "frozen"])
def test_gpu_realistic(dtype, M, K, N, R, b, variant, poison_empty):
    test_lora_ops.run_and_check("cuda", dtype, M, K, N, R, b, **variant)
    test_dora.run_and_check("cuda", dtype, M, K, N, R, b, **variant)


@pytest.mark.gpu
@needs_gpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_multi_lora_mixes(dtype, poison_empty):
    linear, pool, adapters = test_multi_lora.make_setup(dtype, K=4096, N=1024)
    for mix in ("identical", "distinct", "zipf", "some-none"):
        test_multi_lora.check("cuda", dtype, linear, pool, adapters, test_multi_lora.adapter_mix(mix, 300, 5, seed=1))


@pytest.mark.gpu
@needs_gpu_ext
def test_gpu_multi_lora_corrupt_metadata_stays_in_bounds():
    """Run under compute-sanitizer by scripts/gpu_run.sh: no read outside the pool for ids the Python side forbids."""
    args, given, served = _corrupt_batch_case(torch.device("cuda"), torch.float32)
    y = cuda_ext.multi_lora_forward(*args, *given, None, None, 0)
    assert rel_err(y, multi_lora_reference(*args, *served)) < REL_TOL[torch.float32]


@pytest.mark.gpu
@needs_gpu_ext
def test_gpu_automatic_choice_falls_back_to_cuda_without_triton(monkeypatch):
    """Where Triton cannot run, the automatic choice on CUDA tensors is the extension (not the reference)."""
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    real = backend_mod.availability
    monkeypatch.setattr(backend_mod, "availability", lambda n, d: "no Triton" if n == "triton" else real(n, d))
    assert available_backends("cuda")[0] == "cuda"
    import lowrank_kernels.ops.lora as lora_ops

    calls = []
    impl = lora_ops._FORWARD_IMPLS["cuda"]
    monkeypatch.setitem(lora_ops._FORWARD_IMPLS, "cuda", lambda *a, **k: calls.append(1) or impl(*a, **k))
    x, weight, bias_t, A, B, _ = make_lora_inputs(5, 64, 32, 4, torch.float16, device=DEVICE)
    y = lora_linear(x, weight, bias_t, A, B, scale=1.0)
    assert calls == [1]
    y_ref, _ = test_lora_ops.oracle(x, weight, bias_t, A, B, None, scale=1.0, rank=4)
    assert rel_err(y, y_ref) < REL_TOL[torch.float16]


@pytest.mark.gpu
@needs_gpu_ext
def test_gpu_cuda_graph_capture():
    """The launchers allocate through torch and read every size on the host: a captured LoRA forward replays."""
    x, weight, bias_t, A, B, _ = make_lora_inputs(8, 256, 128, 16, torch.bfloat16, device=DEVICE)
    with use_backend("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            lora_linear(x, weight, bias_t, A, B, scale=1.0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lora_linear(x, weight, bias_t, A, B, scale=1.0)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y_ref, _ = test_lora_ops.oracle(x, weight, bias_t, A, B, None, scale=1.0, rank=16)
    assert rel_err(y, y_ref) < REL_TOL[torch.bfloat16]


def test_dtype_codes_cover_the_kernel_dtypes():
    assert set(cuda_ext.DTYPE_CODES) == set(backend_mod.KERNEL_DTYPES)
