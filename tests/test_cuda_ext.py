"""The CUDA C++ backend: ``csrc/`` (built into ``lowrank_kernels._C``), its wrappers (``lowrank_kernels/_cuda_ext.py``)
and the ops' primitives on it (``ops/lora/cuda.py``, ``ops/dora/cuda.py``), primitive by primitive.

Without a GPU (CI): the extension builds and imports where nvcc is; its bindings check their arguments before any
CUDA call; every primitive's Python plumbing runs on CPU tensors through ``RecordingRuntime``, which records each
launch and makes it on the real binding with its sizes set to 0 (the C++ checks every argument, operand dtype
patterns included, then returns): keyword names, argument types and dtype patterns are the binding's, and the
tests check what the primitive hands over (rank slices, masks, output dtypes). Nothing here computes the kernels'
math. Dispatch says why the backend cannot run on CPU tensors; importing the package loads no extension.

On a GPU (marked ``gpu``): every primitive against its naive twin in float64, in strided layouts, float32 / float16
/ bfloat16, odd shapes, ranks past the active rank, dropout. The op suites (test_lora_ops, test_dora) run end to end
on backend "cuda" there too: ``helpers.kernel_backends`` includes it when the extension is built.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
from lowrank_kernels import _cuda_ext as cuda_ext
from lowrank_kernels import backend as backend_mod
from lowrank_kernels.ops.dora import cuda as dora_cuda
from lowrank_kernels.ops.dora import naive as dora_naive
from lowrank_kernels.ops.dora.op import dora_linear, dora_weight_norm
from lowrank_kernels.ops.lora import cuda as lora_cuda
from lowrank_kernels.ops.lora import naive as lora_naive
from lowrank_kernels.ops.multi_lora import cuda as multi_lora_cuda
from lowrank_kernels.ops.multi_lora import naive as multi_lora_naive
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
needs_ext = pytest.mark.skipif(EXT is None, reason="lowrank_kernels._C is not built (test_extension_is_built_... says)")
needs_gpu_ext = pytest.mark.skipif(not (HAS_CUDA and EXT is not None), reason="needs a CUDA GPU and the extension")

BINDINGS = ("gemm", "dropout_mask", "dropout_combine", "dora_dropout_output", "col_dot", "dora_norm_finish",
            "multi_lora_shrink", "multi_lora_expand")  # fmt: skip
F32, F16, BF16 = (cuda_ext.DTYPE_CODES[d] for d in (torch.float32, torch.float16, torch.bfloat16))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 2**40 + 5  # the kernels take the low 32 bits, as the naive mask does


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


# ---- the extension: built, importable without a GPU, bindings check their arguments first --------------------------


def test_extension_is_built_where_nvcc_is():
    """CI has nvcc: the install must have built and loaded the extension (a stale or broken build fails here)."""
    if EXT is None and not NVCC:
        pytest.skip("no nvcc here and no prebuilt extension")
    assert EXT is not None, f"lowrank_kernels._C does not import: {backend_mod.import_error('lowrank_kernels._C')}"
    for name in BINDINGS:
        assert callable(getattr(EXT, name)), name
    assert (EXT.DTYPE_FLOAT32, EXT.DTYPE_FLOAT16, EXT.DTYPE_BFLOAT16) == (F32, F16, BF16)
    masks = (EXT.MASK_NONE, EXT.MASK_A, EXT.MASK_B, EXT.MASK_C)
    assert masks == (cuda_ext.MASK_NONE, cuda_ext.MASK_A, cuda_ext.MASK_B, cuda_ext.MASK_C)
    assert set(cuda_ext.DTYPE_CODES) == set(backend_mod.KERNEL_DTYPES)


def _gemm_kwargs(**overrides):
    kw = dict(M=0, N=4, K=4, a=0, a_dtype=F32, a_s0=4, a_s1=1, b=0, b_dtype=F32, b_s0=4, b_s1=1, c=0, c_dtype=F32,
              c_s0=4, c_s1=1, alpha=1.0, cin=0, cin_s0=0, cin_s1=0, beta=0.0, k_scale=0, row_scale=0, col_scale=0,
              post_scale=0, bias=0, mask_on=0, seed=0, p=0.0, mask_cols=0, stream=0)  # fmt: skip
    return kw | overrides


@needs_ext
def test_bindings_check_their_arguments_before_any_launch():
    """Every check runs before a size-0 call returns and before any CUDA call: ValueError with the reason, here."""
    EXT.gemm(**_gemm_kwargs())  # an empty product: nothing to launch, no error
    with pytest.raises(ValueError, match="negative size"):
        EXT.gemm(**_gemm_kwargs(M=-1))
    with pytest.raises(ValueError, match="operands mix float16 and bfloat16"):
        EXT.gemm(**_gemm_kwargs(a_dtype=F16, b_dtype=BF16))
    with pytest.raises(ValueError, match=r"unsupported operand dtypes \(a, b, c\) = \(float16, float16, float16\)"):
        EXT.gemm(**_gemm_kwargs(a_dtype=F16, b_dtype=F16, c_dtype=F16))  # size 0, still refused
    with pytest.raises(ValueError, match="bad dtype code 7"):
        EXT.gemm(**_gemm_kwargs(a_dtype=7))
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
    with pytest.raises(ValueError, match="col_dot: unsupported dtype code 3"):
        EXT.col_dot(dtype=3, M=0, N=0, p=0, p_s0=1, p_s1=1, q=0, q_s0=1, q_s1=1, out=0, stream=0)
    with pytest.raises(TypeError):  # pybind11: a wrong keyword never reaches C++
        EXT.gemm(**_gemm_kwargs(alpah=1.0))


def test_importing_the_package_loads_no_extension():
    """The extension loads on first launch only: importing the package, the ops and their CUDA primitives never."""
    modules = "lowrank_kernels, lowrank_kernels.ops.lora.op, lowrank_kernels.ops.dora.op, lowrank_kernels._cuda_ext"
    code = (f"import sys, {modules}, lowrank_kernels.ops.lora.cuda, lowrank_kernels.ops.dora.cuda; "
            "sys.exit('lowrank_kernels._C' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def _setup_module():
    """The repository's setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("lowrank_setup", Path(__file__).resolve().parent.parent / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PTXAS_SAMPLE = """\
ptxas info    : Compiling entry function '_ZN7lowrank12_GLOBAL__N_111gemm_kernelIfffEEvNS0_8GemmArgsE' for 'sm_80'
ptxas info    : Function properties for _ZN7lowrank12_GLOBAL__N_111gemm_kernelIfffEEvNS0_8GemmArgsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 62 registers, used 1 barriers, 8320 bytes smem, 552 bytes cmem[0]
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""


def test_the_build_reads_ptxas_resource_usage_and_flags_spills():
    """setup.py's report (the build fails on its spills): one row per kernel and arch, names demangled when
    c++filt is there; PTX of the newest plain arch is embedded beside each arch's SASS."""
    build = _setup_module()
    rows = build.parse_resource_usage(PTXAS_SAMPLE)
    assert [(r["arch"], r["registers"], r["spill_stores"], r["spill_loads"], r["stack"], r["smem"]) for r in rows] == [
        ("sm_80", 62, 0, 0, 0, 8320),
        ("sm_90", 255, 16, 8, 24, 0),
    ]
    if shutil.which("c++filt"):
        assert [r["kernel"] for r in rows] == ["gemm_kernel<float, float, float>", "kernel"]
    line, spills = build.resource_summary(rows)
    assert spills == [f"{rows[1]['kernel']} on sm_90"] and "62-255 registers, 1 spill" in line
    sass, ptx = "-gencode=arch=compute_{0},code=sm_{0}", "-gencode=arch=compute_{0},code=compute_{0}"
    assert build.gencode_flags("80;90") == [sass.format(80), sass.format(90), ptx.format(90)]


# ---- dispatch: why the backend cannot run ------------------------------------------------------------------------


def test_cpu_tensors_exclude_the_cuda_backend():
    assert "cuda" not in available_backends("cpu")
    assert backend_mod.availability("cuda", torch.device("cpu")) == "the CUDA extension needs CUDA tensors (got cpu)"


@pytest.mark.parametrize("op", ["lora", "dora", "dora_norm"])
def test_requested_cuda_on_cpu_tensors_raises_with_the_reason(op):
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float32, device="cpu")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="'cuda' was requested.*needs CUDA tensors"):
        if op == "lora":
            lora_linear(x, weight, bias, A, B, scale=1.0)
        elif op == "dora":
            dora_linear(x, weight, bias, A, B, torch.ones(8), scale=1.0, weight_norm=torch.ones(8))
        else:
            dora_weight_norm(weight, A, B, scale=1.0)


def test_requested_cuda_refuses_float64(monkeypatch):
    """float64 is the reference's alone: asked for by name where the extension could run, the call says why."""
    monkeypatch.setattr(backend_mod, "availability", lambda name, device: None)
    x, weight, bias, A, B, _ = make_lora_inputs(3, 16, 8, 2, torch.float64, device="cpu")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="kernels take float16/bfloat16/float32"):
        lora_linear(x, weight, bias, A, B, scale=1.0)


def test_the_runtime_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu"):
        cuda_ext.runtime(torch.device("cpu"))


# ---- the Python plumbing of every primitive, on CPU: a recording runtime over the real bindings -------------------


SIZE_ARGUMENTS = ("M", "N", "K", "P", "Q", "capacity")  # any one at 0 makes a binding return after its checks


class RecordingRuntime:
    """Stands in for ``_cuda_ext.Runtime`` on CPU tensors: records each launch ``(binding, kwargs)`` and makes it on
    the real binding with its sizes (``SIZE_ARGUMENTS``) set to 0, so the C++ checks every argument and launches
    nothing. Outputs stay as the primitive allocated them: these tests check plumbing, never values."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __call__(self, fn: str, **kwargs) -> None:
        self.calls.append((fn, kwargs))
        sizes = {name: 0 for name in SIZE_ARGUMENTS if name in kwargs}
        getattr(EXT, fn)(**(kwargs | sizes), stream=0)


@pytest.fixture
def recorded(monkeypatch):
    """Every launch of the CUDA primitives (and ops) on CPU tensors goes to a RecordingRuntime; yields the calls."""
    calls = []
    record = lambda device: RecordingRuntime(calls)
    monkeypatch.setattr(cuda_ext, "runtime", record)
    monkeypatch.setattr(multi_lora_cuda, "runtime", record)  # imported by name there
    real = backend_mod.availability
    monkeypatch.setattr(
        backend_mod, "availability", lambda name, device: None if name == "cuda" else real(name, device)
    )
    return calls


def _inputs(dtype, M=7, K=24, N=20, R=8, seed=0):
    x, weight, bias, A, B, _ = make_lora_inputs(M, K, N, R, dtype, device="cpu", seed=seed)
    return x, weight, bias, A, B


def _assert_like(actual, expected):
    """Same structure, shapes and dtypes as the naive twin's result (None where it has None)."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_like(a, e)
        return
    if expected is None:
        assert actual is None
        return
    assert (actual.shape, actual.dtype, actual.device) == (expected.shape, expected.dtype, expected.device)


def _gemms(calls):
    assert all(fn in BINDINGS for fn, _ in calls)
    return [kw for fn, kw in calls if fn == "gemm"]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_shrink_hands_over_the_active_ranks_and_x_mask(recorded, dtype, dropout):
    x, _, _, A, _ = _inputs(dtype)
    t = lora_cuda.shrink(x.t().contiguous().t(), A, 5, p_drop=dropout, seed=SEED)
    _assert_like(t, lora_naive.shrink(x, A, 5, p_drop=dropout, seed=SEED))
    (g,) = _gemms(recorded)
    assert (g["M"], g["N"], g["K"]) == (7, 5, 24)  # ranks past 5 are neither read nor written
    assert (g["a_s0"], g["a_s1"], g["b_s0"], g["b_s1"], g["c_s0"], g["c_s1"]) == (1, 7, 1, 24, 8, 1)
    assert (g["a_dtype"], g["b_dtype"], g["c_dtype"]) == (cuda_ext.code(x), cuda_ext.code(x), F32)
    mask = (cuda_ext.MASK_A, dropout, SEED & 0xFFFFFFFF, 24) if dropout else (cuda_ext.MASK_NONE, 0.0, 0, 0)
    assert (g["mask_on"], g["p"], g["seed"], g["mask_cols"]) == mask
    assert torch.count_nonzero(t[:, 5:]) == 0


def _matmul_case(dtype, case):
    """Arguments of ``lowrank_matmul`` for one of its forms (the op's calls: LoRA's forward and dx, DoRA's forms)."""
    x, weight, bias, A, B = _inputs(dtype)
    t = torch.randn(7, 8)
    kwargs = dict(scale=0.5, rank=5)
    v = torch.rand(8, dtype=dtype) if case == "rank-scale" else None
    if case == "dx":  # the backward's dx: over N, A^T as the up matrix, the mask in the epilogue
        return (x.new_empty(7, 20).normal_(), weight.t(), None, t, A.t(), v), kwargs | dict(
            p_drop=0.3, seed=SEED, epilogue_dropout=True)  # fmt: skip
    if case.startswith("dora"):
        kwargs["col_scale"] = (torch.rand(20, dtype=dtype) + 0.5, torch.rand(20) + 0.5)
        kwargs["save_z"] = case.endswith("save-z")
        if "dropped-x" in case:
            xd, _ = dora_naive.dropout_shrink(x, A, 5, p_drop=0.3, seed=SEED)
            kwargs |= dict(dropped_x=xd, p_drop=0.3, seed=SEED)
    return (x, weight, None if case == "no-bias" else bias, t, B, v), kwargs


MATMUL_CASES = ["lora", "no-bias", "rank-scale", "dx", "dora", "dora-save-z", "dora-dropped-x",
                "dora-dropped-x-save-z"]  # fmt: skip


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_lowrank_matmul_forms(recorded, dtype, case):
    """y and z as the naive twin returns them; the low-rank GEMMs read ranks [0, rank) only, in the epilogue's form."""
    args, kwargs = _matmul_case(dtype, case)
    out = lora_cuda.lowrank_matmul(*args, **kwargs)
    _assert_like(out, lora_naive.lowrank_matmul(*args, **kwargs))
    gemms = _gemms(recorded)
    M, N, code = args[0].shape[0], args[1].shape[0], cuda_ext.code(args[0])
    for g in gemms:
        assert (g["M"], g["N"], g["K"]) == (M, N, 5)
        assert (g["a_dtype"], g["b_dtype"], g["c_dtype"], g["alpha"]) == (F32, code, code, 0.5)
        assert g["cin"] != 0 and g["beta"] != 0.0  # the base product enters the epilogue
        assert (g["k_scale"] != 0) == (case == "rank-scale")
        assert (g["mask_on"], g["mask_cols"]) == ((cuda_ext.MASK_C, N) if case == "dx" else (cuda_ext.MASK_NONE, 0))
    if case.startswith("dora") and "dropped-x" not in case:
        assert [g["post_scale"] != 0 for g in gemms] == [False] * kwargs["save_z"] + [True]  # z, then y = g z + bias
    names = [fn for fn, _ in recorded]
    assert names.count("dora_dropout_output") == ("dropped-x" in case)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("rank_start, dropout, rank_scale", [(0, 0.0, False), (3, 0.3, True)])
def test_weight_grad_reads_ranks_from_rank_start(recorded, dtype, rank_start, dropout, rank_scale):
    x, _, _, _, _ = _inputs(dtype)
    t, v = torch.randn(7, 8), (torch.rand(8, dtype=dtype) if rank_scale else None)
    kwargs = dict(scale=0.5, rank_start=rank_start, rank=6, p_drop=dropout, seed=SEED)
    out = lora_cuda.weight_grad(t, x[:, ::2], v, **kwargs)
    _assert_like(out, lora_naive.weight_grad(t, x[:, ::2], v, **kwargs))
    (g,) = _gemms(recorded)
    assert (g["M"], g["N"], g["K"], g["a_s0"], g["a_s1"]) == (6 - rank_start, 12, 7, 1, 8)
    assert (g["a_dtype"], g["b_dtype"], g["c_dtype"]) == (F32, cuda_ext.code(x), F32)
    assert (g["row_scale"] != 0) == rank_scale
    assert (g["mask_on"], g["mask_cols"]) == ((cuda_ext.MASK_B, 12) if dropout else (cuda_ext.MASK_NONE, 0))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("cached", [False, True], ids=["w0sq-summed", "w0sq-cached"])
def test_row_norm_plumbing(recorded, dtype, cached):
    _, weight, _, A, B = _inputs(dtype)
    cache = dora_naive.weight_norm_sq(weight).float() if cached else None
    args = (weight, A, B.t().contiguous().t(), cache)
    norm = dora_cuda.row_norm(*args, scale=0.5, rank=5)
    _assert_like(norm, dora_naive.row_norm(*args, scale=0.5, rank=5))
    names = [fn for fn, _ in recorded]
    assert names == ["gemm", "gemm", "gemm", "dora_norm_finish"]
    (_, finish) = recorded[-1]
    assert (finish["rank"], finish["w0sq"] != 0, finish["b_s0"], finish["b_s1"]) == (5, cached, 1, 20)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_dropout_shrink_plumbing(recorded, dtype):
    x, _, _, A, _ = _inputs(dtype)
    out = dora_cuda.dropout_shrink(x[:, ::2], A[:, ::2], 5, p_drop=0.3, seed=SEED)
    _assert_like(out, dora_naive.dropout_shrink(x[:, ::2], A[:, ::2], 5, p_drop=0.3, seed=SEED))
    (_, combine), (_, g) = recorded
    assert (combine["scale_kept"], combine["base"], combine["src_s1"], combine["seed"]) == (
        False,
        0,
        2,
        SEED & 0xFFFFFFFF,
    )
    assert (g["mask_on"], g["mask_cols"], g["N"]) == (cuda_ext.MASK_A, 12, 5)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_dora_dx_plumbing(recorded, dtype, dropout):
    _, weight, _, A, _ = _inputs(dtype)
    dy, g, t = torch.randn(7, 20).to(dtype), torch.rand(20) + 0.5, torch.randn(7, 8)
    kwargs = dict(scale=0.5, rank=5, p_drop=dropout, seed=SEED)
    _assert_like(dora_cuda.dora_dx(dy, weight, g, t, A, **kwargs), dora_naive.dora_dx(dy, weight, g, t, A, **kwargs))
    names = [fn for fn, _ in recorded]
    assert names == (["gemm", "dropout_combine"] if dropout else ["gemm"])
    assert recorded[0][1]["K"] == 5


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_col_dot_plumbing(recorded, dtype):
    p, q = torch.randn(7, 20).to(dtype), torch.randn(20, 7).to(dtype).t()
    _assert_like(dora_cuda.col_dot(p, q), dora_naive.col_dot(p, q))
    ((fn, kw),) = recorded
    assert (fn, kw["M"], kw["N"], kw["q_s0"], kw["q_s1"]) == ("col_dot", 7, 20, 1, 7)


@needs_ext
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_the_ops_run_their_cuda_primitives_end_to_end(recorded, dtype, dropout):
    """lora_linear and dora_linear, forward and backward, through dispatch, the custom ops and every CUDA primitive
    (no fallback: a launch the binding refuses fails the test); outputs and gradients have their shapes and dtypes."""
    x, weight, bias, A, B = _inputs(dtype, M=9)
    params = [t.requires_grad_() for t in (x, A, B)]
    magnitude = (torch.rand(20) + 0.5).to(dtype).requires_grad_()
    with use_backend("cuda"):
        y = lora_linear(x, weight, bias, A, B, scale=0.5, rank=5, dropout=dropout, seed=3)
        grads = torch.autograd.grad(y, params, torch.ones_like(y))
        lora_launches = len(recorded)
        yd = dora_linear(x, weight, bias, A, B, magnitude, scale=0.5, rank=5, dropout=dropout, seed=3)
        dora_grads = torch.autograd.grad(yd, [*params, magnitude], torch.ones_like(yd))
    for out, like in ((y, x.new_empty(9, 20)), (yd, x.new_empty(9, 20))):
        _assert_like(out.detach(), like)
    for g, p in zip([*grads, *dora_grads], [*params, *params, magnitude], strict=True):
        _assert_like(g, p.detach())
    names = {fn for fn, _ in recorded}
    assert lora_launches >= 5 and names >= {"gemm", "dora_norm_finish", "col_dot"}
    assert ("dropout_combine" in names and "dora_dropout_output" in names) == (dropout > 0)


@needs_ext
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_multi_lora_runs_its_cuda_primitives_end_to_end(recorded, dropout):
    """The multi-adapter op (LoRA and DoRA slots, rows without adapter), forward and backward, on its bindings."""
    x, weight, bias, A, B = _inputs(torch.float32)
    pool = AdapterPool(24, 20, 3, 8, trainable=True, base_weight=weight)
    pool.add("lora", A[:4], B[:, :4], alpha=2.0)
    pool.add("dora", A, B, alpha=2.0, magnitude=torch.rand(20) + 0.5)
    batch = AdapterBatch.build(pool, [0, -1, 1, 0, 1, 1, -1])
    x.requires_grad_()
    with use_backend("cuda"):
        y = multi_lora_linear(x, weight, bias, pool, batch, dropout=dropout, seed=3)
        params = [x, *(p for p in pool.parameters() if p.requires_grad)]
        grads = torch.autograd.grad(y, params, torch.ones_like(y))
    _assert_like(y.detach(), x.new_empty(7, 20))
    for g, p in zip(grads, params, strict=True):
        _assert_like(g, p.detach())
    assert {fn for fn, _ in recorded} >= {"multi_lora_shrink", "multi_lora_expand", "multi_lora_segment_grad"}


def test_wrappers_check_what_the_extension_would_misread():
    x, _, _, A, _ = _inputs(torch.float32)
    out = torch.empty(7, 8)
    with pytest.raises(ValueError, match="do not chain"):
        cuda_ext.gemm(x, A, out)
    with pytest.raises(ValueError, match="k_scale must be a contiguous float32"):
        cuda_ext.gemm(x, A.t(), out, k_scale=torch.ones(24, dtype=torch.float16))
    with pytest.raises(ValueError, match="beta != 0 needs cin"):
        cuda_ext.gemm(x, A.t(), out, beta=1.0)
    with pytest.raises(ValueError, match="0 < p < 1"):
        cuda_ext.Mask(cuda_ext.MASK_A, 1.0, 0, 24)
    with pytest.raises(ValueError, match="at least 8 entries"):
        cuda_ext.vector(torch.ones(5), 8, "rank_scale")
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        cuda_ext.code(x.double())
    assert cuda_ext.dropout_on(cuda_ext.MASK_A, 0.0, SEED, cols=24) is None


# ---- GPU: every primitive against its naive twin in float64 --------------------------------------------------------

LAYOUTS = ["contiguous", "column-major", "stride-2"]


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as the 2-D ``t`` in another memory layout."""
    if layout == "column-major":
        return t.t().contiguous().t()
    if layout == "stride-2":  # every other column of a buffer twice as wide
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t.contiguous()


def _f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _gpu_inputs(dtype, layout, M=37, K=70, N=45, R=16, seed=0):
    x, weight, bias, A, B, _ = make_lora_inputs(M, K, N, R, dtype, device=DEVICE, seed=seed)
    return [in_layout(t, layout) for t in (x, weight, A, B)] + [bias]


by_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
by_layout = pytest.mark.parametrize("layout", LAYOUTS)


@pytest.mark.gpu
@needs_gpu_ext
@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 - 1, 2**40 + 3])
def test_gpu_dropout_mask_is_the_naive_mask_bit_for_bit(seed):
    for shape, p in (((40, 64), 0.25), ((333, 777), 0.1), ((1, 4099), 0.5)):
        mask = cuda_ext.dropout_mask(seed, shape, p, "cuda")
        assert torch.equal(mask.cpu(), lora_naive.dropout_mask(seed, shape, p)), (shape, p)


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_gpu_shrink(dtype, layout, dropout, poison_empty):
    x, _, A, _, _ = _gpu_inputs(dtype, layout)
    t = lora_cuda.shrink(x, A, 11, p_drop=dropout, seed=SEED)
    ref = lora_naive.shrink(*_f64(x, A), 11, p_drop=dropout, seed=SEED)
    assert t.dtype == torch.float32 and t.shape == (37, 16)
    assert rel_err(t, ref) < REL_TOL[torch.float32]
    assert torch.count_nonzero(t[:, 11:]) == 0


def _gpu_matmul_case(dtype, layout, case):
    x, weight, A, B, bias = _gpu_inputs(dtype, layout)
    g = torch.Generator().manual_seed(3)
    t = in_layout(torch.randn(37, 16, generator=g).to(DEVICE), layout)
    v = (torch.rand(16, generator=g) + 0.5).to(DEVICE, dtype) if case == "rank-scale" else None
    kwargs = dict(scale=0.75, rank=11)
    if case == "dx":
        dy = in_layout(torch.randn(37, 45, generator=g).to(DEVICE, dtype), layout)
        return (dy, weight.t(), None, t, A.t(), v), kwargs | dict(p_drop=0.3, seed=SEED, epilogue_dropout=True)
    if case.startswith("dora"):
        magnitude = (torch.rand(45, generator=g) + 0.5).to(DEVICE, dtype)
        kwargs["col_scale"] = (magnitude, (torch.rand(45, generator=g) + 0.5).to(DEVICE))
        kwargs["save_z"] = case.endswith("save-z")
        if "dropped-x" in case:
            xd, _ = dora_naive.dropout_shrink(x, A, 11, p_drop=0.3, seed=SEED)
            kwargs |= dict(dropped_x=in_layout(xd, layout), p_drop=0.3, seed=SEED)
    return (x, weight, None if case == "no-bias" else bias, t, B, v), kwargs


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
@pytest.mark.parametrize("case", MATMUL_CASES)
def test_gpu_lowrank_matmul(dtype, layout, case, poison_empty):
    args, kwargs = _gpu_matmul_case(dtype, layout, case)
    y, z = lora_cuda.lowrank_matmul(*args, **kwargs)
    ref_kwargs = dict(kwargs)  # the twin's tensor arguments in float64
    if "col_scale" in kwargs:
        ref_kwargs["col_scale"] = tuple(_f64(*kwargs["col_scale"]))
    if "dropped_x" in kwargs:
        ref_kwargs["dropped_x"] = kwargs["dropped_x"].double()
    y_ref, z_ref = lora_naive.lowrank_matmul(*_f64(*args), **ref_kwargs)
    assert y.dtype == dtype and rel_err(y, y_ref) < REL_TOL[dtype]
    assert (z is None) == (z_ref is None)
    if z is not None:
        assert z.dtype == dtype and rel_err(z, z_ref) < REL_TOL[dtype]


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
@pytest.mark.parametrize("rank_start, dropout, rank_scale", [(0, 0.0, False), (0, 0.3, True), (10, 0.2, False)])
def test_gpu_weight_grad(dtype, layout, rank_start, dropout, rank_scale, poison_empty):
    x, _, _, _, _ = _gpu_inputs(dtype, layout)
    t = in_layout(torch.randn(37, 16, device=DEVICE), layout)
    v = (torch.rand(16, device=DEVICE) + 0.5).to(dtype) if rank_scale else None
    kwargs = dict(scale=0.75, rank_start=rank_start, rank=11, p_drop=dropout, seed=SEED)
    out = lora_cuda.weight_grad(t, x, v, **kwargs)
    assert out.dtype == torch.float32 and out.shape == (11 - rank_start, 70)
    assert rel_err(out, lora_naive.weight_grad(*_f64(t, x, v), **kwargs)) < REL_TOL[torch.float32]


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
@pytest.mark.parametrize("cached", [False, True], ids=["w0sq-summed", "w0sq-cached"])
@pytest.mark.parametrize("R, b", [(16, 11), (160, 150)])
def test_gpu_row_norm(dtype, layout, cached, R, b):
    """Factored where it is accurate; the rows where W0 ~ -s B A (the factored sum cancels) computed directly."""
    _, weight, A, B, _ = _gpu_inputs(dtype, layout, R=R)
    scale = 2.5
    cancel = torch.arange(0, 45, 7, device=DEVICE)
    w = weight.double()
    noise = 1e-3 * torch.randn(len(cancel), 70, device=DEVICE, dtype=torch.float64)
    w[cancel] = -scale * (B[cancel, :b].double() @ A[:b].double()) + noise
    weight = in_layout(w.to(dtype), layout)
    direct = torch.linalg.vector_norm(weight.double() + scale * (B[:, :b].double() @ A[:b].double()), dim=1)
    cache = dora_naive.weight_norm_sq(weight).float() if cached else None
    norm = dora_cuda.row_norm(weight, A, B, cache, scale=scale, rank=b)
    assert norm.dtype == torch.float32 and norm.shape == (45,)
    assert rel_err(norm, direct) < 1e-5
    assert ((norm[cancel].double() - direct[cancel]).abs() / direct[cancel]).max() < 1e-3  # factored: ~100% off


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
def test_gpu_dropout_shrink(dtype, layout, poison_empty):
    x, _, A, _, _ = _gpu_inputs(dtype, layout)
    xd, t = dora_cuda.dropout_shrink(x, A, 11, p_drop=0.3, seed=SEED)
    xd_ref, _ = dora_naive.dropout_shrink(x, A, 11, p_drop=0.3, seed=SEED)
    assert xd.dtype == dtype and torch.equal(xd, xd_ref)  # a selection of x's values: exact
    assert rel_err(t, lora_naive.shrink(*_f64(x, A), 11, p_drop=0.3, seed=SEED)) < REL_TOL[torch.float32]
    assert torch.count_nonzero(t[:, 11:]) == 0


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_gpu_dora_dx(dtype, layout, dropout, poison_empty):
    _, weight, A, _, _ = _gpu_inputs(dtype, layout)
    gen = torch.Generator().manual_seed(5)
    dy = in_layout(torch.randn(37, 45, generator=gen).to(DEVICE, dtype), layout)
    g = (torch.rand(45, generator=gen) + 0.5).to(DEVICE)
    t = in_layout(torch.randn(37, 16, generator=gen).to(DEVICE), layout)
    kwargs = dict(scale=0.75, rank=11, p_drop=dropout, seed=SEED)
    dx = dora_cuda.dora_dx(dy, weight, g, t, A, **kwargs)
    assert dx.dtype == dtype and dx.shape == (37, 70)
    assert rel_err(dx, dora_naive.dora_dx(*_f64(dy, weight, g, t, A), **kwargs)) < REL_TOL[dtype]


@pytest.mark.gpu
@needs_gpu_ext
@by_dtype
@by_layout
@pytest.mark.parametrize("M", [1, 37, 1000])
def test_gpu_col_dot(dtype, layout, M):
    gen = torch.Generator().manual_seed(6)
    p, q = (in_layout(torch.randn(M, 45, generator=gen).to(DEVICE, dtype), layout) for _ in range(2))
    out = dora_cuda.col_dot(p, q)
    assert out.dtype == torch.float32 and out.shape == (45,)
    assert rel_err(out, dora_naive.col_dot(*_f64(p, q))) < REL_TOL[torch.float32] * 10  # long fp32 sums


@pytest.mark.gpu
@needs_gpu_ext
def test_gpu_automatic_choice_runs_the_extension_without_triton(monkeypatch):
    """Where Triton cannot run, the automatic choice on CUDA tensors is the extension (not the reference)."""
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    real = backend_mod.availability
    monkeypatch.setattr(backend_mod, "availability", lambda n, d: "no Triton" if n == "triton" else real(n, d))
    calls = []
    shrink = lora_cuda.shrink
    monkeypatch.setattr(lora_cuda, "shrink", lambda *a, **k: calls.append(1) or shrink(*a, **k))
    x, weight, bias, A, B, _ = make_lora_inputs(5, 64, 32, 4, torch.float16, device=DEVICE)
    y = lora_linear(x, weight, bias, A, B, scale=1.0)
    assert calls == [1]
    y_ref = lora_naive.lora_linear_ref(*_f64(x, weight, bias, A, B), 1.0)
    assert rel_err(y, y_ref) < REL_TOL[torch.float16]


@pytest.mark.gpu
@needs_gpu_ext
def test_gpu_cuda_graph_capture():
    """The primitives allocate through torch and read every size on the host: a captured LoRA forward replays."""
    x, weight, bias, A, B, _ = make_lora_inputs(8, 256, 128, 16, torch.bfloat16, device=DEVICE)
    with use_backend("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            lora_linear(x, weight, bias, A, B, scale=1.0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lora_linear(x, weight, bias, A, B, scale=1.0)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    y_ref = lora_naive.lora_linear_ref(*_f64(x, weight, bias, A, B), 1.0)
    assert rel_err(y, y_ref) < REL_TOL[torch.bfloat16]


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
    served_slot = torch.where((slot < 0) | (slot >= n), -1, slot).to(torch.int32)  # what the kernels serve
    served_rank = torch.where(served_slot >= 0, rank.clamp(0, R), 0).to(torch.int32)
    args = (x, weight, bias, A, B, gscale, dora)
    return args, (slot, rank, scale), (served_slot, served_rank, scale)


@pytest.mark.gpu
@needs_gpu_ext
def test_gpu_multi_lora_corrupt_metadata_stays_in_bounds():
    """Second line of defence, run under compute-sanitizer by scripts/gpu_run.sh: a slot outside [0, capacity) is a
    row without adapter, a rank past R is R, and nothing is read outside the pool."""
    args, given, served = _corrupt_batch_case(DEVICE, torch.float32)
    y = multi_lora_cuda.multi_lora_forward(*args, *given, None, None, 0)
    assert rel_err(y, multi_lora_naive.multi_lora_forward(*_f64(*args[:6]), args[6], *served)) < REL_TOL[torch.float32]


def _check_op_on_cuda(op, dtype, M, K, N, R, b, dropout):
    """lora_linear / dora_linear on backend "cuda", forward and every gradient, against the float64 autograd oracle."""
    x, weight, bias, A, B, _ = make_lora_inputs(M, K, N, R, dtype, device=DEVICE)
    magnitude = (torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5).to(DEVICE, dtype)
    params = [x, A, B] + ([magnitude] if op == "dora" else [])
    for t in params:
        t.requires_grad_()
    kwargs = dict(scale=0.75, rank=b, dropout=dropout, seed=1234 if dropout else None)
    with use_backend("cuda"):
        y = lora_linear(x, weight, bias, A, B, **kwargs) if op == "lora" else dora_linear(
            x, weight, bias, A, B, magnitude, **kwargs)  # fmt: skip
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    mask = lora_naive.dropout_mask(1234, (M, K), dropout, DEVICE).double() if dropout else None
    ref_params = [t.detach().double().requires_grad_() for t in params]
    ref_x, ref_A, ref_B = ref_params[:3]
    if op == "lora":
        y_ref = lora_naive.lora_linear_ref(ref_x, weight.double(), bias.double(), ref_A, ref_B, 0.75, b, None, mask)
    else:
        y_ref = dora_naive.dora_linear_ref(ref_x, weight.double(), bias.double(), ref_A, ref_B, ref_params[3], 0.75, b,
                                           mask)  # fmt: skip
    grads_ref = torch.autograd.grad(y_ref, ref_params, grad_out.double())
    assert y.dtype == dtype and rel_err(y, y_ref) < REL_TOL[dtype]
    for name, g, g_ref in zip(["x", "lora_A", "lora_B", "magnitude"], grads, grads_ref, strict=False):
        assert g.dtype == dtype and rel_err(g, g_ref) < REL_TOL[dtype], name


@pytest.mark.gpu
@needs_gpu_ext
@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_gpu_realistic_sizes_on_the_cuda_backend(op, dropout, poison_empty):
    """A Llama-7B MLP shape at prefill in bfloat16, rank 8 of 64 active: the op suites' cases are small."""
    _check_op_on_cuda(op, torch.bfloat16, 2049, 4096, 11008, 64, 8, dropout)
