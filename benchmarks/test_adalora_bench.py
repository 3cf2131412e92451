"""AdaLoRA forward and forward+backward with half of the triplets masked, against none masked and against peft.

    pytest benchmarks/test_adalora_bench.py --benchmark-only --benchmark-json=bench.json

Same protocol and harness as ``test_lora_bench.py`` (imported from it: timing, CUDA-graph replays, inputs, records):
bf16, Llama-7B shapes, ``M`` in ``BENCH_M``, allocated rank ``r = 64`` (``RANKCMP_R``), so 50% masked is 32 triplets.
Every row is one provider at one (op, shape, M), and its ratio is to ``masked0`` of the same (op, shape, M), timed
once per process on the same tensors:

- ``masked0``: ``AdaLoRALinear`` with no triplet masked (``lora_linear`` at rank 64 with the per-rank scale lambda).
- ``compact50``: 32 masked, after ``compact()`` (kept triplets first): the op at truncated rank 32 on the
  parameters themselves, i.e. the cost of the smaller rank (the goal for masking: ratio ~ what rank 32 costs).
- ``masked50``: 32 masked, scattered (every other triplet): the training path, three small gathers then rank 32.
- ``masked50lg`` (fwdbwd only): as ``masked50`` while the allocator still reallocates (``lambda_grad=True``): the
  backward also computes peft's gradient of the 32 masked singular values (two thin products at rank 32).
- ``peft``: peft's AdaLoRA ``SVDLinear`` with the same Q, P and lambda (masked lambda = 0): it computes all 64 ranks
  whatever is masked, in bf16 like the input.

Each provider's output (and the gradients of x, Q, P, lambda) is checked against the fp32 formula of peft's
``SVDLinear`` before timing (relative L2 error < 2e-2; masked lambda get a zero gradient where the provider skips
them entirely, peft's gradient otherwise). Rows are ``kind="adalora"``; ``benchmarks/report.py`` ignores them until
it gets an AdaLoRA table, and each row's ``extra_info`` already holds ``ratio``/``graph_ratio`` to ``masked0``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time

import pytest
import torch
from test_lora_bench import (
    DEVICE,
    DTYPE,
    SHAPES,
    Timing,
    _activations,
    _adapter,
    _first_call,
    _measure,
    _randn,
    _ratio,
    _record,
    _set_fused_env,
    _us,
    _weight,
)
from torch import nn

from lowrank_kernels.modules.adalora import AdaLoRALinear
from lowrank_kernels.shapes import BENCH_M, DECODE_MAX_M, RANKS, LayerShape, floor_us

R = max(RANKS)  # 64: the masked half (32 ranks) is the largest share of the adapter's cost the shapes allow
ALPHA = 2.0 * R  # scale alpha / (r + 1e-5) ~ 2, as the LoRA benchmark's
REL_TOL = 2e-2  # bf16 rounds at 2^-9 ~ 2e-3; a dropped triplet or a wrong scale moves the result by >= 10%
HAS_PEFT = importlib.util.find_spec("peft") is not None
PROVIDERS = ("masked0", "compact50", "masked50", "masked50lg", "peft")
BASELINE = "masked0"
SCATTERED_KEEP = [i % 2 == 0 for i in range(R)]  # every other triplet kept: the gather path
PREFIX_KEEP = [i < R // 2 for i in range(R)]  # what compact() leaves: the truncated-rank path


@dataclasses.dataclass(frozen=True)
class AdaCase:
    op: str  # "fwd" | "fwdbwd"
    shape: LayerShape
    M: int
    provider: str

    @property
    def id(self) -> str:
        return f"adalora-{self.op}-{self.shape.id}-M{self.M}-r{R}-{self.provider}"

    @property
    def graphed(self) -> bool:
        return self.M <= DECODE_MAX_M

    @property
    def keep(self) -> list[bool] | None:
        return {"masked0": None, "compact50": PREFIX_KEEP, "peft": None}.get(self.provider, SCATTERED_KEEP)

    @property
    def masked_lambda_get_peft_grad(self) -> bool:
        return self.provider in ("masked50lg", "peft", "masked0")


def _params():
    """Shape-major (the conftest sorts by shape too), then op, M; each (op, shape, M) starts with its baseline."""
    for shape in SHAPES:
        for op in ("fwd", "fwdbwd"):
            for M in BENCH_M:
                for provider in PROVIDERS:
                    if provider == "masked50lg" and op == "fwd":
                        continue  # lambda_grad only changes the backward
                    case = AdaCase(op, shape, M, provider)
                    marks = (
                        (pytest.mark.skip(reason="peft is not installed"),)
                        if provider == "peft" and not HAS_PEFT
                        else ()
                    )
                    yield pytest.param(case, id=case.id, marks=marks)


# ---- inputs: the LoRA benchmark's W0, x, dy and (Q, P) = (A, B); lambda random with the masked half zero -------


@functools.lru_cache(maxsize=2)
def _lambda(masked: bool) -> torch.Tensor:
    """lambda [R, 1]: O(1) values (never AdaLoRA's zero init); the scattered half zero when ``masked`` (as the
    allocator leaves them: compact50 sees the same values, permuted)."""
    lam = _randn((R, 1), 1.0, seed=6_000)
    if masked:
        lam = lam.masked_fill(~torch.tensor(SCATTERED_KEEP, device=DEVICE).view(-1, 1), 0.0)
    return lam


def _layer(case: AdaCase) -> AdaLoRALinear:
    K, N = case.shape.K, case.shape.N
    linear = nn.Linear(K, N, bias=False, device="meta")
    linear.weight = nn.Parameter(_weight(K, N), requires_grad=False)
    layer = AdaLoRALinear.from_linear(linear, R, alpha=ALPHA)
    Q, P = _adapter(K, N, R)
    masked = case.keep is not None
    layer.lora_A = nn.Parameter(Q.clone())
    layer.lora_B = nn.Parameter(P.clone())
    layer.lora_E = nn.Parameter(_lambda(masked).clone())
    layer.ranknum = nn.Parameter(torch.full((1,), float(R), device=DEVICE, dtype=DTYPE), requires_grad=False)
    if masked:
        layer.set_triplet_mask(torch.tensor(SCATTERED_KEEP), lambda_grad=case.provider == "masked50lg")
        if case.provider == "compact50":
            layer.compact()
    return layer.eval()


def _peft_layer(case: AdaCase) -> nn.Module:
    try:
        import peft
        from peft.tuners.adalora import SVDLinear
    except Exception as exc:  # installed but broken (peft imports transformers): skip the row, say why
        pytest.skip(f"peft is installed but does not import: {type(exc).__name__}: {exc}")
    K, N = case.shape.K, case.shape.N
    linear = nn.Linear(K, N, bias=False, device="meta")
    linear.weight = nn.Parameter(_weight(K, N), requires_grad=False)
    holder = nn.Module()
    holder.proj = linear
    config = peft.AdaLoraConfig(init_r=R, target_r=R // 2, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"],
                                total_step=1_000)  # fmt: skip
    layer = peft.inject_adapter_in_model(config, holder).proj
    if not isinstance(layer, SVDLinear):
        raise TypeError(f"peft wrapped the layer as {type(layer).__name__}, expected peft's AdaLoRA SVDLinear")
    Q, P = _adapter(K, N, R)
    with torch.no_grad():
        for name, value in (("lora_A", Q), ("lora_B", P), ("lora_E", _lambda(True))):
            getattr(layer, name)["default"] = nn.Parameter(value.clone())
        layer.ranknum["default"] = nn.Parameter(
            torch.full((1,), float(R), device=DEVICE, dtype=DTYPE), requires_grad=False
        )
    return layer.eval()


def _provider_fn(case: AdaCase):
    """Zero-argument callable: (y,) for fwd; (y, dx, dQ, dP, dlambda) for fwdbwd."""
    K, N = case.shape.K, case.shape.N
    x, dy = _activations(K, N, case.M)
    if case.provider == "peft":
        layer = _peft_layer(case)
        params = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"])
        forward = layer
    else:
        layer = _layer(case)
        params = (layer.lora_A, layer.lora_B, layer.lora_E)
        forward = layer
    if case.op == "fwd":

        def fn():
            with torch.no_grad():
                return (forward(x),)

        return fn, layer
    x = x.detach().requires_grad_()

    def fn():
        y = forward(x)
        return (y, *torch.autograd.grad(y, (x, *params), dy))

    return fn, layer


def _reference(case: AdaCase, layer) -> tuple[torch.Tensor, ...]:
    """fp32 peft SVDLinear formula on the provider's own (bf16) values, upcast; all 64 triplets computed."""
    K, N = case.shape.K, case.shape.N
    x, dy = (t.float() for t in _activations(K, N, case.M))
    if case.provider == "peft":
        Q, P, E = (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"])
    else:
        Q, P, E = layer.lora_A, layer.lora_B, layer.lora_E
    Q, P, E = (t.detach().float().requires_grad_() for t in (Q, P, E))
    x.requires_grad_(case.op == "fwdbwd")
    y = x @ _weight(K, N).float().t() + (x @ (Q * E).t() @ P.t()) * (ALPHA / (R + 1e-5))
    if case.op == "fwd":
        return (y.detach(),)
    grads = list(torch.autograd.grad(y, (x, Q, P, E), dy.float()))
    if not case.masked_lambda_get_peft_grad:  # skipped entirely: masked lambda get no gradient
        keep = torch.tensor(case.keep, device=DEVICE)
        grads[3] = grads[3] * keep.view(-1, 1)
    return (y.detach(), *grads)


def _check(out, ref, what: str) -> float:
    """Largest relative L2 error over (y, dx, dQ, dP, dlambda); fails the row past REL_TOL (nothing wrong is timed)."""
    names = ("y", "dx", "dQ", "dP", "dlambda")[: len(ref)]
    assert len(out) == len(ref), f"{what}: {len(out)} outputs, expected {len(ref)}"
    worst = 0.0
    for name, o, r in zip(names, out, ref, strict=True):
        assert o.shape == r.shape, f"{what}: {name} has shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        o = o.float()
        assert torch.isfinite(o).all(), f"{what}: {name} has non-finite values"
        err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert err < REL_TOL, f"{what}: {name} relative error {err:.2e} >= {REL_TOL} against the fp32 reference"
        worst = max(worst, err)
    return worst


_BASELINES: dict[tuple[str, str, int], Timing] = {}


def _checked_timing(case: AdaCase):
    fn, layer = _provider_fn(case)
    ref = _reference(case, layer)
    out, peak_mib = _first_call(fn)
    max_err = _check(out, ref, case.id)
    del out
    timing = _measure(fn, case.graphed, lambda o, where: _check(o, ref, f"{case.id} ({where})"))
    return fn, timing, max_err, peak_mib


def _baseline_timing(case: AdaCase) -> Timing:
    key = (case.op, case.shape.id, case.M)
    if key not in _BASELINES:
        _BASELINES[key] = _checked_timing(dataclasses.replace(case, provider=BASELINE))[1]
    return _BASELINES[key]


@pytest.mark.parametrize("case", list(_params()))
def test_adalora(case: AdaCase, benchmark, bench_env, monkeypatch):
    if case.provider != "peft":
        _set_fused_env(monkeypatch, gemm="auto")
    started = time.monotonic()
    fn, timing, max_err, peak_mib = _checked_timing(case)
    if case.provider == BASELINE:
        _BASELINES[(case.op, case.shape.id, case.M)] = timing
    base = _baseline_timing(case)
    active = R if case.provider in ("masked0", "peft") else R // 2
    one = floor_us(case.M, case.shape.K, case.shape.N, active)
    info = {
        "kind": "adalora",
        "op": case.op,
        "shape": case.shape.id,
        "K": case.shape.K,
        "N": case.shape.N,
        "M": case.M,
        "r": R,
        "b": active,
        "provider": case.provider,
        "baseline": BASELINE,
        "median_us": _us(timing.median_us),
        "graph_us": _us(timing.graph_us),
        "graph_error": timing.graph_error,
        "baseline_us": _us(base.median_us),
        "baseline_graph_us": _us(base.graph_us),
        "ratio": _ratio(timing.median_us, base.median_us),
        "graph_ratio": _ratio(timing.graph_us, base.graph_us),
        "max_rel_err": float(f"{max_err:.3g}"),
        "peak_mib": round(peak_mib, 1),
        "floor_us": round(one if case.op == "fwd" else 2 * one, 2),
        "wall_s": round(time.monotonic() - started, 2),
    }
    _record(benchmark, bench_env, case.id, info, fn)
