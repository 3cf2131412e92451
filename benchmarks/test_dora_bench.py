"""DoRA forward (training and inference) and forward+backward, timed against fused LoRA, cuBLAS and peft's DoRA
(test_lora_bench's protocol; the harness, inputs and checks are test_lora_bench's).

    pytest benchmarks/test_dora_bench.py --benchmark-only --benchmark-json=bench.json
    python benchmarks/test_dora_bench.py bench.json          # the DoRA ratio tables (report.py prints LoRA's)

Every row is one provider at one (op, layer shape K x N, tokens M, rank r = b), bf16:

- op ``fwd``: baseline ``cublas`` = ``F.linear(x, W0)``. Providers: ``lora`` (``lora_linear``, fused, Triton backend:
  the reference the DoRA goals are written against), ``dora`` (``dora_linear`` in training: the row norm recomputed
  every call, ``||W0||^2`` cached as ``DoRALinear`` caches it), ``doraeval`` (inference: the norm cached, as
  ``DoRALinear`` does while A and B are unchanged), ``eager`` (``dora_linear_ref``: unfused PyTorch with the
  direct norm of ``W0 + s B A``) and ``peft`` (peft's DoRA ``lora.Linear`` on the same W0, A, B, m).
- op ``fwdbwd``: forward + the gradients of x, A, B (and m for DoRA). Baseline ``frozen`` = ``F.linear`` forward
  + input gradient; providers ``lora``, ``dora``, ``eager``, ``peft``.
- ops ``fwd-drop`` / ``fwdbwd-drop``: the same with adapter dropout p = 0.1 (DoRA's dropout form: peft runs the
  base GEMM twice, our GEMM reads each W0 tile once for x and drop(x)); providers ``lora``, ``dora``, ``peft``
  (peft's dropout module replaced by one applying our mask, so every provider computes the same numbers).

Each row records its ratio to the baseline and, for DoRA rows, ``lora_ratio`` (time over the fused LoRA row of the
same op, shape, M, r: the issue's goals) and ``lora_peak_ratio`` (peak extra memory of the call over LoRA's).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_lora_bench import (
    DEVICE,
    DTYPE,
    HAS_PEFT,
    SCALE,
    SHAPES,
    Timing,
    _activations,
    _adapter,
    _check,
    _first_call,
    _measure,
    _ratio,
    _record,
    _set_fused_env,
    _us,
    _weight,
)
from torch import nn

from lowrank_kernels import lora_linear, use_backend
from lowrank_kernels.ops.dora.naive import dora_linear_ref
from lowrank_kernels.ops.dora.op import dora_linear, dora_weight_norm, weight_norm_sq
from lowrank_kernels.ops.lora.naive import dropout_mask, lora_linear_ref
from lowrank_kernels.shapes import BENCH_M, DECODE_MAX_M, DROPOUT_P, RANKS, LayerShape, floor_us

DROPOUT = DROPOUT_P  # the registry's, as the AOT compile sweep uses
DROPOUT_RANKS = (16,)  # the dropout form is timed at one rank: its cost is the second base GEMM, not the rank
SEED = 1
BASELINE = {"fwd": "cublas", "fwdbwd": "frozen", "fwd-drop": "cublas", "fwdbwd-drop": "frozen"}
PROVIDERS = {
    "fwd": ("lora", "dora", "doraeval", "eager", "peft"),
    "fwdbwd": ("lora", "dora", "eager", "peft"),
    "fwd-drop": ("lora", "dora", "peft"),
    "fwdbwd-drop": ("lora", "dora", "peft"),
}
# The first milestone, DoRA time over fused LoRA time: (provider, op, min M, limit).
GOALS = (
    ("dora", "fwd", 2048, 1.20),
    ("doraeval", "fwd", 1, 1.05),
    ("dora", "fwdbwd", 2048, 1.25),
)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # "fwd" | "fwdbwd" | "fwd-drop" | "fwdbwd-drop"
    shape: LayerShape
    M: int
    provider: str  # "cublas" | "frozen" | "lora" | "dora" | "doraeval" | "eager" | "peft"
    r: int | None = None  # None for the baselines

    @property
    def id(self) -> str:
        rank = "" if self.r is None else f"-r{self.r}"
        return f"dora-{self.op}-{self.shape.id}-M{self.M}{rank}-{self.provider}"

    @property
    def grad(self) -> bool:
        return self.op.startswith("fwdbwd")

    @property
    def dropout(self) -> float:
        return DROPOUT if self.op.endswith("-drop") else 0.0

    @property
    def is_baseline(self) -> bool:
        return self.provider == BASELINE[self.op]

    @property
    def graphed(self) -> bool:
        return self.M <= DECODE_MAX_M


def _dora_params():
    """Shape-major, then op, M, r; each (op, shape, M) starts with its baseline and each r with fused LoRA."""
    for shape in SHAPES:
        for op, providers in PROVIDERS.items():
            for M in BENCH_M:
                base = Case(op, shape, M, BASELINE[op])
                yield pytest.param(base, id=base.id)
                for r in DROPOUT_RANKS if op.endswith("-drop") else RANKS:
                    for provider in providers:
                        case = Case(op, shape, M, provider, r)
                        marks = ()
                        if provider == "peft" and not HAS_PEFT:
                            marks = (pytest.mark.skip(reason="peft is not installed"),)
                        yield pytest.param(case, id=case.id, marks=marks)


# ---- inputs: test_lora_bench's (x, dy, W0, A, B), plus the magnitude and the caches ---------------------------


@functools.lru_cache(maxsize=2)
def _magnitude(K: int, N: int) -> torch.Tensor:
    """m around the row norms of W0 (0.5x .. 1.5x), so g = m / ||W0 + s B A|| is O(1) and far from 1."""
    norms = torch.linalg.vector_norm(_weight(K, N).float(), dim=1)
    u = torch.rand(N, generator=torch.Generator(device=DEVICE).manual_seed(6_000 + N), device=DEVICE)
    return (norms * (0.5 + u)).to(DTYPE)


@functools.lru_cache(maxsize=1)
def _weight_norm_sq(K: int, N: int) -> torch.Tensor:
    return weight_norm_sq(_weight(K, N))


@functools.lru_cache(maxsize=2)
def _cached_norm(K: int, N: int, r: int) -> torch.Tensor:
    A, B = _adapter(K, N, r)
    return dora_weight_norm(_weight(K, N), A, B, scale=SCALE, weight_norm_sq=_weight_norm_sq(K, N))


@functools.lru_cache(maxsize=1)
def _mask(M: int, K: int) -> torch.Tensor:
    return dropout_mask(SEED, (M, K), DROPOUT, DEVICE)


def _inputs(case: Case):
    K, N = case.shape.K, case.shape.N
    x, dy = _activations(K, N, case.M)
    A, B = (None, None) if case.r is None else _adapter(K, N, case.r)
    return x, _weight(K, N), A, B, _magnitude(K, N), dy


class _FixedMask(nn.Module):
    """Stands in for peft's dropout module: multiplies by our mask, so peft computes the very same numbers."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


@functools.lru_cache(maxsize=1)
def _peft_layer(K: int, N: int, r: int, M: int | None) -> nn.Module:
    """peft's DoRA lora.Linear around the benchmark's W0 with A, B and m copied in, bf16 like the input.

    ``M``: with dropout (training mode), the row count of the fixed mask; None: eval mode, no dropout.
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
    config = peft.LoraConfig(r=r, lora_alpha=round(SCALE * r), lora_dropout=0.0 if M is None else DROPOUT,
                             use_dora=True, target_modules=["proj"], bias="none")  # fmt: skip
    layer = peft.inject_adapter_in_model(config, holder).proj
    if not isinstance(layer, PeftLoraLinear):
        raise TypeError(f"peft wrapped the layer as {type(layer).__name__}, expected peft.tuners.lora.Linear")
    layer.lora_A["default"].to(device=DEVICE, dtype=DTYPE)
    layer.lora_B["default"].to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    layer.eval()
    layer(_activations(K, N, 1)[0])  # peft sets its magnitude up on the first forward; then ours replaces it
    magnitude = layer.lora_magnitude_vector["default"]
    magnitude.to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        magnitude.weight.copy_(_magnitude(K, N))
    layer.requires_grad_(False)  # W0 frozen (inject_adapter_in_model leaves that to PeftModel)
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude.weight):
        p.requires_grad_(True)
    if M is not None:
        layer.lora_dropout["default"] = _FixedMask(_mask(M, K))
        layer.train()  # peft's dropout form runs in training mode only
    return layer


# ---- what is timed ---------------------------------------------------------------------------------------------


def _provider_fn(case: Case):
    """A zero-argument callable running one provider; returns (y,) for fwd, (y, dx, dA, dB[, dm]) for fwdbwd."""
    x, W0, A, B, m, dy = _inputs(case)
    K, N, p = case.shape.K, case.shape.N, case.provider
    dropout = case.dropout
    if case.grad:  # W0 stays frozen in every provider; A, B and m are trained
        x = x.detach().requires_grad_()
        if A is not None:
            A, B, m = (t.detach().requires_grad_() for t in (A, B, m))
    wrt = (x, A, B, m)
    if p in ("cublas", "frozen"):
        wrt = (x,)

        def forward(x):
            return F.linear(x, W0)
    elif p == "lora":
        wrt = (x, A, B)

        def forward(x):
            with use_backend("triton"):
                return lora_linear(x, W0, None, A, B, scale=SCALE, dropout=dropout, seed=SEED)
    elif p in ("dora", "doraeval"):
        w0sq = _weight_norm_sq(K, N)
        norm = _cached_norm(K, N, case.r) if p == "doraeval" else None

        def forward(x):
            with use_backend("triton"):
                return dora_linear(x, W0, None, A, B, m, scale=SCALE, dropout=dropout, seed=SEED,
                                   weight_norm_sq=w0sq, weight_norm=norm)  # fmt: skip
    elif p == "eager":

        def forward(x):
            return dora_linear_ref(x, W0, None, A, B, m, SCALE)
    elif p == "peft":
        forward = _peft_layer(K, N, case.r, case.M if dropout else None)
        adapter = (forward.lora_A["default"].weight, forward.lora_B["default"].weight,
                   forward.lora_magnitude_vector["default"].weight)  # fmt: skip
        wrt = (x, *adapter)
    else:
        raise ValueError(f"unknown provider {p!r}")

    if not case.grad:

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
    x, W0, A, B, m, dy = (None if t is None else t.float() for t in _inputs(case))
    if case.is_baseline:
        y = F.linear(x, W0)
        return (y,) if not case.grad else (y, dy @ W0)
    mask = _mask(case.M, case.shape.K) if case.dropout else None
    if case.provider == "lora":
        params = (x, A, B)

        def formula(x, A, B):
            return lora_linear_ref(x, W0, None, A, B, SCALE, dropout_mask=mask)
    else:
        params = (x, A, B, m)

        def formula(x, A, B, m):
            return dora_linear_ref(x, W0, None, A, B, m, SCALE, dropout_mask=mask)

    if not case.grad:
        return (formula(*params),)
    params = [t.requires_grad_() for t in params]
    y = formula(*params)
    return (y.detach(), *torch.autograd.grad(y, params, dy))


def _checked_timing(case: Case):
    """Check ``case``'s provider against the fp32 reference, then time it. Returns (fn, Timing, max error, peak MiB)."""
    fn, ref = _provider_fn(case), _reference(case)
    out, peak_mib = _first_call(fn)
    max_err = _dora_check(out, ref, case.id)
    del out
    timing = _measure(fn, case.graphed, lambda o, where: _dora_check(o, ref, f"{case.id} ({where})"))
    return fn, timing, max_err, peak_mib


def _dora_check(out, ref, what) -> float:
    """test_lora_bench's check over (y, dx, dA, dB), then dm's (test_lora_bench names four outputs)."""
    worst = _check(out[:4], ref[:4], what)
    if len(out) > 4:
        worst = max(worst, _check(out[4:], ref[4:], f"{what} (dm)"))
    return worst


_BASELINES: dict[tuple[str, str, int], Timing] = {}
_LORA: dict[tuple[str, str, int, int], tuple[Timing, float]] = {}  # (op, shape, M, r) -> (timing, peak MiB)


def _baseline_timing(case: Case) -> Timing:
    key = (case.op, case.shape.id, case.M)
    if key not in _BASELINES:
        _BASELINES[key] = _checked_timing(Case(case.op, case.shape, case.M, BASELINE[case.op]))[1]
    return _BASELINES[key]


def _lora_timing(case: Case) -> tuple[Timing, float]:
    key = (case.op, case.shape.id, case.M, case.r)
    if key not in _LORA:
        _, timing, _, peak = _checked_timing(dataclasses.replace(case, provider="lora"))
        _LORA[key] = (timing, peak)
    return _LORA[key]


def _headline(timing: Timing, graphed: bool) -> float | None:
    """The time a ratio is judged on: CUDA-graph replays at decode when captured, else the CUDA-event median."""
    return timing.graph_us if graphed and timing.graph_us is not None else timing.median_us


@pytest.mark.parametrize("case", list(_dora_params()))
def test_dora(case: Case, benchmark, bench_env, monkeypatch):
    _set_fused_env(monkeypatch, gemm="auto")  # Triton by name (backward included), automatic GEMM strategy
    started = time.monotonic()
    fn, timing, max_err, peak_mib = _checked_timing(case)
    if case.is_baseline:
        _BASELINES[(case.op, case.shape.id, case.M)] = timing
    if case.provider == "lora":
        _LORA[(case.op, case.shape.id, case.M, case.r)] = (timing, peak_mib)
    base = _baseline_timing(case)
    info = {
        "kind": "dora",
        "op": case.op,
        "shape": case.shape.id,
        "K": case.shape.K,
        "N": case.shape.N,
        "M": case.M,
        "r": case.r,
        "b": case.r,
        "provider": case.provider,
        "dropout": case.dropout,
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
        "floor_us": round(floor_us(case.M, case.shape.K, case.shape.N, case.r or 0) * (2 if case.grad else 1), 2),
        "wall_s": round(time.monotonic() - started, 2),
    }
    if not case.is_baseline and case.provider != "lora":
        lora, lora_peak = _lora_timing(case)
        info["lora_us"] = _us(_headline(lora, case.graphed))
        info["lora_ratio"] = _ratio(_headline(timing, case.graphed), _headline(lora, case.graphed))
        info["lora_peak_mib"] = round(lora_peak, 1)
        info["lora_peak_ratio"] = _ratio(peak_mib, lora_peak)
    _record(benchmark, bench_env, case.id, info, fn)


# ---- report: python benchmarks/test_dora_bench.py bench.json (or the LOWRANK_BENCH_JSONL stream) ---------------


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(path: Path) -> str:
    """Markdown tables of the DoRA rows: time over fused LoRA (the goals), over the baseline, peak memory."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = [{"id": b["name"], **(b.get("extra_info") or {})} for b in json.loads(text)["benchmarks"]]
    rows = [r for r in rows if r.get("kind") == "dora" and r.get("r") is not None]
    env = next((r for r in rows if r.get("gpu")), {})
    out = [f"# DoRA benchmarks: {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, bf16", ""]
    out += [
        "Ratios: time over fused LoRA of the same op/shape/M/r (the goals), and over cuBLAS/frozen (in brackets); "
        "decode (M <= 64) from CUDA-graph replays where captured. Peak: extra MiB of one call, DoRA / LoRA.",
        "",
    ]
    misses = []
    for op, providers in PROVIDERS.items():
        table = defaultdict(dict)
        for row in rows:
            if row["op"] == op:
                table[(row["shape"], row["M"], row["r"])][row["provider"]] = row
        if not table:
            continue
        shown = [p for p in providers if p != "lora"]
        out += [f"## {op}", "", "| shape KxN | M | r | " + " | ".join(shown) + " | peak MiB dora / lora |",
                "|---|---:|---:|" + "---:|" * len(shown) + "---:|"]  # fmt: skip
        for (shape, M, r), provs in sorted(table.items(), key=lambda kv: (*map(int, kv[0][0].split("x")), *kv[0][1:])):
            cells = []
            for p in shown:
                row = provs.get(p)
                if row is None:
                    cells.append("-")
                    continue
                base = row.get("graph_ratio") if M <= DECODE_MAX_M and row.get("graph_ratio") else row.get("ratio")
                cells.append(f"{_fmt(row.get('lora_ratio'))} ({_fmt(base)})")
                for provider, goal_op, min_m, limit in GOALS:
                    ratio = row.get("lora_ratio")
                    if p == provider and op == goal_op and M >= min_m and ratio is not None and ratio > limit:
                        misses.append(f"{op} {p} {shape} M={M} r={r}: {ratio:.2f} x LoRA (goal <= {limit:.2f})")
            dora = provs.get("dora", {})
            out.append(f"| {shape} | {M} | {r} | " + " | ".join(cells)
                       + f" | {_fmt(dora.get('peak_mib'), 1)} / {_fmt(dora.get('lora_peak_mib'), 1)} |")  # fmt: skip
        out.append("")
    out += ["## Goals (issue 3, first milestone)", ""]
    out += [f"- MISS: {m}" for m in misses] or ["- all measured rows meet the goals"]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/test_dora_bench.py bench.json|bench.jsonl")
    print(report(Path(sys.argv[1])))
