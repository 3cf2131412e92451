"""LoRA / DyLoRA forward and forward+backward, timed against their baselines (protocol below).

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json && python benchmarks/report.py bench.json

Every row is one provider at one (op, layer shape K x N, tokens M, allocated rank r, active rank b), bf16:

- op ``fwd``: baseline ``cublas`` = ``F.linear(x, W0)``; providers ``fused`` (``lora_linear`` on the Triton
  backend with its automatic strategy: one fused launch at M <= 64, cuBLAS GEMM + shrink + in-place rank-b addmm
  above), ``tritongemm`` (M > 64 only: the same op forced onto our own Triton GEMM with the low-rank epilogue,
  ``LOWRANK_KERNELS_LORA_GEMM=triton``), ``eager`` (``lora_linear_ref``: unfused PyTorch, the package's
  reference), ``cuda`` (``lora_linear`` on the CUDA C++ backend, csrc/: cuBLAS GEMM + our shrink and expand
  kernels; skipped when lowrank_kernels._C is not built) and ``peft`` (peft's ``lora.Linear`` around the same W0,
  A, B; only at b = r: peft cannot truncate).
- op ``fwdbwd``: forward + backward. Baseline ``frozen`` = ``F.linear`` forward + input gradient (W0 frozen);
  the providers return the output and the gradients for x, A and B.
- ``rankcmp``: the fused op at b = 8 and b = 64 with the same R = 64 tensors, timed back to back.

Protocol: inputs are deterministic ``randn`` (B too: never LoRA's zero init, never zeros); each provider's output
(and gradients) is checked against the fp32 reference (relative L2 error < 2e-2) before it is timed, and again
after a CUDA-graph capture. Times are ``triton.testing.do_bench`` medians (CUDA events, L2 flushed between
calls); at M <= 64 also CUDA-graph replays (how serving engines run decode: no host launch cost). The baseline of
each (op, shape, M) is timed once per process on the same inputs, just before its providers, and every row
stores its ratio to it. Results go to ``benchmark.extra_info``; pytest-benchmark's own statistics are a few
synchronised host wall-clock calls (launch overhead included), kept cheap on purpose.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_kernels import lora_linear, use_backend
from lowrank_kernels.backend import ENV_VAR as BACKEND_ENV_VAR
from lowrank_kernels.ops.lora.naive import lora_linear_ref
from lowrank_kernels.shapes import (
    BENCH_M,
    DECODE_MAX_M,
    LLAMA_7B_SHAPES,
    RANKS,
    TRUNCATED_RANK,
    LayerShape,
    active_ranks,
    floor_us,
)

DEVICE = "cuda"  # the conftest skips every benchmark without one
DTYPE = torch.bfloat16
SCALE = 2.0  # LoRA's alpha / r with alpha = 2r; peft gets lora_alpha = 2r, so the same scale
REL_TOL = 2e-2  # bf16 rounds at 2^-9 ~ 2e-3; a dropped adapter term or a wrong rank moves the result by >= 10%
BASELINE = {"fwd": "cublas", "fwdbwd": "frozen"}
PROVIDERS = ("fused", "tritongemm", "cuda", "eager", "peft")
FUSED = ("fused", "tritongemm")  # lora_linear on the Triton backend
GEMM_ENV_VAR = "LOWRANK_KERNELS_LORA_GEMM"  # lowrank_kernels.kernels.lora.GEMM_ENV_VAR (importing it needs Triton)
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_CUDA_EXT = importlib.util.find_spec("lowrank_kernels._C") is not None
QUICK = os.environ.get("LOWRANK_BENCH_QUICK", "0") not in ("", "0")
SHAPES = LLAMA_7B_SHAPES[:1] if QUICK else LLAMA_7B_SHAPES  # quick: 4096x4096 only
WARMUP_MS = float(os.environ.get("LOWRANK_BENCH_WARMUP_MS", "10"))
REP_MS = float(os.environ.get("LOWRANK_BENCH_REP_MS", "50"))  # ~400 replays at decode, >= 15 calls at 8192
RANKCMP_R = max(RANKS)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "fwd" | "fwdbwd"
    shape: LayerShape
    M: int
    provider: str  # "cublas" | "frozen" | "fused" | "tritongemm" | "cuda" | "eager" | "peft"
    r: int | None = None  # None for the baselines
    b: int | None = None

    @property
    def id(self) -> str:
        rb = "" if self.r is None else f"-r{self.r}-b{self.b}"
        return f"{self.op}-{self.shape.id}-M{self.M}{rb}-{self.provider}"

    @property
    def is_baseline(self) -> bool:
        return self.provider == BASELINE[self.op]

    @property
    def graphed(self) -> bool:
        return self.M <= DECODE_MAX_M


def _lora_params():
    """Shape-major, then op, M; each (op, shape, M) starts with its baseline. A time budget cuts whole shapes last."""
    for shape in SHAPES:
        for op in ("fwd", "fwdbwd"):
            for M in BENCH_M:
                base = Case(op, shape, M, BASELINE[op])
                yield pytest.param(base, id=base.id)
                for r in RANKS:
                    for b in active_ranks(r):
                        for provider in PROVIDERS:
                            if provider == "peft" and b != r:
                                continue  # peft has no truncated rank
                            if provider == "tritongemm" and M <= DECODE_MAX_M:
                                continue  # at decode the automatic strategy is already the one fused launch
                            case = Case(op, shape, M, provider, r, b)
                            marks = ()
                            if provider == "peft" and not HAS_PEFT:
                                marks = (pytest.mark.skip(reason="peft is not installed"),)
                            if provider == "cuda" and not HAS_CUDA_EXT:
                                marks = (pytest.mark.skip(reason="lowrank_kernels._C is not built"),)
                            yield pytest.param(case, id=case.id, marks=marks)


def _rankcmp_params():
    for shape in SHAPES:
        for op in ("fwd", "fwdbwd"):
            for M in BENCH_M:
                case = Case(op, shape, M, "fused", RANKCMP_R, TRUNCATED_RANK)
                yield pytest.param(case, id=f"rankcmp-{op}-{shape.id}-M{M}-r{RANKCMP_R}-b{TRUNCATED_RANK}vs{RANKCMP_R}")


# ---- inputs: deterministic randn on the GPU, cached so every provider of a row sees the very same tensors ----


def _randn(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float32) * std).to(DTYPE)


@functools.lru_cache(maxsize=1)
def _weight(K: int, N: int) -> torch.Tensor:
    return _randn((N, K), K**-0.5, seed=1_000 + K * 7 + N)  # y = x W0^T has O(1) entries


@functools.lru_cache(maxsize=1)
def _activations(K: int, N: int, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] and the upstream gradient dy [M, N]."""
    return _randn((M, K), 1.0, seed=2_000 + M), _randn((M, N), 1.0, seed=3_000 + M)


@functools.lru_cache(maxsize=2)
def _adapter(K: int, N: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, K], B [N, r]: the adapter term is O(1) like the base term (B is not LoRA's zero init)."""
    return _randn((r, K), K**-0.5, seed=4_000 + r), _randn((N, r), r**-0.5, seed=5_000 + r)


@functools.lru_cache(maxsize=1)
def _peft_layer(K: int, N: int, r: int) -> nn.Module:
    """peft's lora.Linear around the benchmark's W0 with A and B copied in, adapters in bf16 like the input.

    (peft's PeftModel upcasts adapters to fp32 by default, autocast_adapter_dtype=True; that is slower still.)
    """
    try:
        import peft
        from peft.tuners.lora import Linear as PeftLoraLinear
    except Exception as exc:  # installed but broken (peft imports transformers): skip the row, say why
        pytest.skip(f"peft is installed but does not import: {type(exc).__name__}: {exc}")

    A, B = _adapter(K, N, r)
    linear = nn.Linear(K, N, bias=False, device="meta")
    linear.weight = nn.Parameter(_weight(K, N), requires_grad=False)
    holder = nn.Module()
    holder.proj = linear
    config = peft.LoraConfig(r=r, lora_alpha=round(SCALE * r), lora_dropout=0.0, target_modules=["proj"], bias="none")
    layer = peft.inject_adapter_in_model(config, holder).proj
    if not isinstance(layer, PeftLoraLinear):
        raise TypeError(f"peft wrapped the layer as {type(layer).__name__}, expected peft.tuners.lora.Linear")
    layer.lora_A["default"].to(device=DEVICE, dtype=DTYPE)
    layer.lora_B["default"].to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.requires_grad_(False)  # W0 frozen (inject_adapter_in_model leaves that to PeftModel)
    layer.lora_A["default"].weight.requires_grad_(True)
    layer.lora_B["default"].weight.requires_grad_(True)
    if not math.isclose(layer.scaling["default"], SCALE):
        raise ValueError(f"peft scaling {layer.scaling['default']} != {SCALE}")
    return layer.eval()


def _inputs(case: Case):
    K, N = case.shape.K, case.shape.N
    x, dy = _activations(K, N, case.M)
    A, B = (None, None) if case.r is None else _adapter(K, N, case.r)
    return x, _weight(K, N), A, B, dy


# ---- what is timed ---------------------------------------------------------------------------------------------


def _provider_fn(case: Case):
    """A zero-argument callable running one provider; returns (y,) for fwd, (y, dx[, dA, dB]) for fwdbwd."""
    x, W0, A, B, dy = _inputs(case)
    p, b = case.provider, case.b
    grad = case.op == "fwdbwd"
    if grad:  # W0 stays frozen in every provider; A and B are trained
        x = x.detach().requires_grad_()
        if A is not None:
            A, B = A.detach().requires_grad_(), B.detach().requires_grad_()
    wrt = (x, A, B)
    if p in ("cublas", "frozen"):
        wrt = (x,)

        def forward(x):
            return F.linear(x, W0)
    elif p in FUSED:  # the GEMM strategy is picked by the environment (set by the test) at call time

        def forward(x):
            with use_backend("triton"):
                return lora_linear(x, W0, None, A, B, scale=SCALE, rank=b)
    elif p == "cuda":

        def forward(x):
            with use_backend("cuda"):
                return lora_linear(x, W0, None, A, B, scale=SCALE, rank=b)
    elif p == "eager":

        def forward(x):
            return lora_linear_ref(x, W0, None, A, B, SCALE, rank=b)
    elif p == "peft":
        forward = _peft_layer(case.shape.K, case.shape.N, case.r)
        wrt = (x, forward.lora_A["default"].weight, forward.lora_B["default"].weight)
    else:
        raise ValueError(f"unknown provider {p!r}")

    if not grad:

        def fn():
            with torch.no_grad():
                return (forward(x),)

        return fn

    def fn():
        y = forward(x)
        return (y, *torch.autograd.grad(y, wrt, dy))

    return fn


def _reference(case: Case) -> tuple[torch.Tensor, ...]:
    """fp32 outputs (and gradients) of the plain formula on the same bf16 inputs, upcast."""
    x, W0, A, B, dy = (None if t is None else t.float() for t in _inputs(case))
    if case.is_baseline:
        y = F.linear(x, W0)
        return (y,) if case.op == "fwd" else (y, dy @ W0)
    if case.op == "fwd":
        return (lora_linear_ref(x, W0, None, A, B, SCALE, rank=case.b),)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = lora_linear_ref(x, W0, None, A, B, SCALE, rank=case.b)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    return (y.detach(), *grads)


def _check(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], what: str) -> float:
    """Largest relative L2 error over (y, dx, dA, dB); fails the benchmark past REL_TOL (nothing wrong is timed)."""
    names = ("y", "dx", "dA", "dB")
    assert len(out) == len(ref), f"{what}: {len(out)} outputs, expected {len(ref)}"
    worst = 0.0
    for name, o, r in zip(names[: len(out)], out, ref, strict=True):
        assert o.shape == r.shape, f"{what}: {name} has shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        o = o.float()
        assert torch.isfinite(o).all(), f"{what}: {name} has non-finite values"
        err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert err < REL_TOL, f"{what}: {name} relative error {err:.2e} >= {REL_TOL} against the fp32 reference"
        worst = max(worst, err)
    return worst


@dataclasses.dataclass
class Timing:
    median_us: float
    graph_us: float | None = None
    graph_error: str | None = None


def _do_bench_us(fn) -> float:
    from triton.testing import do_bench  # imported here: collecting the benchmarks on CPU needs no Triton

    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e3


def _measure(fn, graphed: bool, check) -> Timing:
    """CUDA-event median of ``fn``; with ``graphed`` also of replays of a CUDA graph of ``fn`` (checked first)."""
    timing = Timing(_do_bench_us(fn))
    if not graphed:
        return timing
    graph = None
    try:
        stream = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graph's docs require
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fn()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # a provider that cannot be captured still gets its event timing; the report says why
        timing.graph_error = f"{type(exc).__name__}: {exc}"[:300]
        # torch.cuda.graph's __exit__ skips restoring the stream when capture_end raises: later rows must not run
        # on the abandoned capture stream.
        torch.cuda.set_stream(torch.cuda.default_stream())
        return timing
    check(static_out, "CUDA-graph replay")  # a stale pointer in a captured launch fails here, not silently
    timing.graph_us = _do_bench_us(graph.replay)
    del graph, static_out
    return timing


def _first_call(fn) -> tuple[tuple[torch.Tensor, ...], float]:
    """Run once (compiles Triton kernels); return the outputs and the peak memory above what was allocated (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / 2**20


_BASELINES: dict[tuple[str, str, int], Timing] = {}


def _baseline_timing(op: str, shape: LayerShape, M: int) -> Timing:
    """The baseline of (op, shape, M), timed once per process on the same inputs (normally by its own row)."""
    key = (op, shape.id, M)
    if key not in _BASELINES:
        _BASELINES[key] = _checked_timing(Case(op, shape, M, BASELINE[op]))[1]
    return _BASELINES[key]


def _ratio(t: float | None, base: float | None) -> float | None:
    return None if t is None or not base else round(t / base, 4)


def _record(benchmark, bench_env: dict, row_id: str, info: dict, fn) -> None:
    """Put ``info`` in extra_info (and the JSONL stream), then let pytest-benchmark time a few synchronised calls."""
    info = {"id": row_id, **info, "dtype": "bf16", "quick": QUICK, "do_bench_rep_ms": REP_MS}
    info.update({k: bench_env.get(k) for k in ("gpu", "torch", "triton", "cuda")})
    benchmark.extra_info.update(info)
    benchmark.group = f"{info['kind']}-{info['op']}-{info['shape']}-M{info['M']}"
    path = os.environ.get("LOWRANK_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(info) + "\n")

    def synchronised():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=5, iterations=1, warmup_rounds=1)


def _floor(case: Case, b: int) -> float:
    """Roofline µs on an H100 for the op (fwd+bwd: the two GEMMs of the frozen baseline; adapter terms ignored)."""
    one = floor_us(case.M, case.shape.K, case.shape.N, b)
    return round(one if case.op == "fwd" else 2 * one, 2)


def _checked_timing(case: Case):
    """Check ``case``'s provider against the fp32 reference, then time it. Returns (fn, Timing, max error, peak MiB)."""
    fn, ref = _provider_fn(case), _reference(case)
    out, peak_mib = _first_call(fn)
    max_err = _check(out, ref, case.id)
    del out
    timing = _measure(fn, case.graphed, lambda o, where: _check(o, ref, f"{case.id} ({where})"))
    return fn, timing, max_err, peak_mib


def _us(t: float | None) -> float | None:
    return None if t is None else round(t, 3)


def _set_fused_env(monkeypatch, gemm: str) -> None:
    """Triton backend by name, in the environment too: backward runs in autograd's device thread, where
    use_backend's context variable is not set, and an automatic choice would silently fall back to torch if Triton
    failed. ``gemm``: the strategy above M = 64 (auto: cuBLAS + epilogue; triton: our GEMM)."""
    monkeypatch.setenv(BACKEND_ENV_VAR, "triton")
    monkeypatch.setenv(GEMM_ENV_VAR, gemm)


@pytest.mark.parametrize("case", list(_lora_params()))
def test_lora(case: Case, benchmark, bench_env, monkeypatch):
    if case.provider in FUSED:
        _set_fused_env(monkeypatch, gemm="triton" if case.provider == "tritongemm" else "auto")
    elif case.provider == "cuda":  # by name in the environment too: the backward runs on autograd's thread
        monkeypatch.setenv(BACKEND_ENV_VAR, "cuda")
    started = time.monotonic()
    fn, timing, max_err, peak_mib = _checked_timing(case)
    if case.is_baseline:
        _BASELINES[(case.op, case.shape.id, case.M)] = timing
    base = _baseline_timing(case.op, case.shape, case.M)
    info = {
        "kind": "lora",
        "op": case.op,
        "shape": case.shape.id,
        "K": case.shape.K,
        "N": case.shape.N,
        "M": case.M,
        "r": case.r,
        "b": case.b,
        "provider": case.provider,
        "gemm": {"fused": "auto", "tritongemm": "triton"}.get(case.provider),
        "baseline": BASELINE[case.op],
        "median_us": _us(timing.median_us),
        "graph_us": _us(timing.graph_us),
        "graph_error": timing.graph_error,
        "baseline_us": _us(base.median_us),
        "baseline_graph_us": _us(base.graph_us),
        "ratio": _ratio(timing.median_us, base.median_us),
        "graph_ratio": _ratio(timing.graph_us, base.graph_us),
        "max_rel_err": float(f"{max_err:.3g}"),
        "peak_mib": round(peak_mib, 1),
        "floor_us": _floor(case, case.b or 0),
        "wall_s": round(time.monotonic() - started, 2),
    }
    _record(benchmark, bench_env, case.id, info, fn)


@pytest.mark.parametrize("case", list(_rankcmp_params()))
def test_rankcmp(case: Case, benchmark, bench_env, monkeypatch):
    """DyLoRA truncation must pay for itself: the fused op at b = 8 no slower than at b = R = 64, same tensors."""
    _set_fused_env(monkeypatch, gemm="auto")
    started = time.monotonic()
    _, full, err_full, _ = _checked_timing(dataclasses.replace(case, b=RANKCMP_R))
    fn, low, err_low, _ = _checked_timing(dataclasses.replace(case, b=TRUNCATED_RANK))
    info = {
        "kind": "rankcmp",
        "op": case.op,
        "shape": case.shape.id,
        "K": case.shape.K,
        "N": case.shape.N,
        "M": case.M,
        "r": RANKCMP_R,
        "b": TRUNCATED_RANK,
        "provider": "fused",
        "gemm": "auto",
        "baseline": f"fused b={RANKCMP_R}",
        "median_us": _us(low.median_us),
        "graph_us": _us(low.graph_us),
        "graph_error": low.graph_error or full.graph_error,
        "baseline_us": _us(full.median_us),
        "baseline_graph_us": _us(full.graph_us),
        "ratio": _ratio(low.median_us, full.median_us),
        "graph_ratio": _ratio(low.graph_us, full.graph_us),
        "max_rel_err": float(f"{max(err_low, err_full):.3g}"),
        "floor_us": _floor(case, TRUNCATED_RANK),
        "wall_s": round(time.monotonic() - started, 2),
    }
    _record(benchmark, bench_env, f"rankcmp-{case.op}-{case.shape.id}-M{case.M}", info, fn)
