"""The benchmarks time only what is right: on a CPU, one tiny row of each benchmark file, every provider it times
(Triton kernels under the interpreter, the eager reference, peft) against the file's own reference check.

The benchmarks themselves need a GPU (their conftest skips them here), so without this a rename in the package
would break them only on the rare GPU run. CI also collects them (``pytest benchmarks --collect-only``).
"""

import importlib.util
import pathlib
import sys

import pytest
import torch
from helpers import HAS_TRITON

from lowrank_kernels.shapes import LayerShape

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
HAS_PEFT = importlib.util.find_spec("peft") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the fused providers run Triton (here: its interpreter)")


def load(name: str):
    """benchmarks/<name>.py as a module (the benchmarks folder is not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def on_cpu(monkeypatch):
    """Point the LoRA, DoRA and AdaLoRA benchmark modules at CPU float32 tensors and empty their input caches."""
    modules = [load("test_lora_bench"), load("test_dora_bench"), load("test_adalora_bench")]
    for module in modules:
        monkeypatch.setattr(module, "DEVICE", "cpu")
        monkeypatch.setattr(module, "DTYPE", torch.float32)
        for value in vars(module).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
    yield modules
    for module in modules:
        for value in vars(module).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()


TINY = LayerShape("tiny", 48, 40)
LORA_PROVIDERS = ["cublas", "frozen", "fused", "tritongemm", "eager"] + (["peft"] if HAS_PEFT else [])


LORA_ROWS = [(op, p) for op in ("fwd", "fwdbwd") for p in LORA_PROVIDERS
             if p not in ("cublas", "frozen") or p == {"fwd": "cublas", "fwdbwd": "frozen"}[op]]  # fmt: skip


@pytest.mark.parametrize("op, provider", LORA_ROWS)
def test_lora_benchmark_providers_compute_the_reference(on_cpu, op, provider, monkeypatch):
    bench = on_cpu[0]
    if provider == "tritongemm":
        monkeypatch.setenv(bench.GEMM_ENV_VAR, "triton")
    r, b = (None, None) if provider in ("cublas", "frozen") else (8, 5 if provider != "peft" else 8)
    case = bench.Case(op, TINY, 70 if provider == "tritongemm" else 5, provider, r, b)
    bench._check(bench._provider_fn(case)(), bench._reference(case), case.id)


DORA_ROWS = [(op, p) for op, providers in load("test_dora_bench").PROVIDERS.items() for p in providers
             if p != "peft" or HAS_PEFT]  # fmt: skip


@pytest.mark.parametrize("op, provider", DORA_ROWS)
def test_dora_benchmark_providers_compute_the_reference(on_cpu, op, provider):
    bench = on_cpu[1]
    case = bench.Case(op, TINY, 5, provider, 8)
    out = bench._provider_fn(case)()
    ref = bench._reference(case)
    assert len(out) == len(ref)
    for o, r in zip(out, ref, strict=True):
        err = ((o.float() - r.float()).norm() / r.float().norm()).item()
        assert err < 2e-2, f"{case.id}: relative error {err:.2e}"


ADALORA_ROWS = [(op, p) for op in ("fwd", "fwdbwd") for p in load("test_adalora_bench").PROVIDERS
                if (p != "peft" or HAS_PEFT) and not (p == "masked50lg" and op == "fwd")]  # fmt: skip


@pytest.mark.parametrize("op, provider", ADALORA_ROWS)
def test_adalora_benchmark_providers_compute_the_reference(on_cpu, op, provider):
    bench = on_cpu[2]
    case = bench.AdaCase(op, LayerShape("tiny", 80, 72), 5, provider)
    fn, layer = bench._provider_fn(case)
    bench._check(fn(), bench._reference(case, layer), case.id)


@pytest.mark.skipif(not HAS_PEFT or importlib.util.find_spec("transformers") is None, reason="needs peft, transformers")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_patch_benchmark_step_runs_patched(method):
    """The peft-patch benchmark's model and step, tiny and float64 on the CPU: the patched loss and one training
    step's adapter gradients equal unpatched peft's, and the report's table lists the row."""
    import lowrank_kernels as lk

    report, bench = load("report"), load("test_peft_patch_bench")
    _model, _step = bench._model, bench._step

    models = [_model(method, device="cpu", dtype=torch.float64, hidden=32, mlp=48, heads=4, vocab=64) for _ in (0, 1)]
    patch = lk.patch_peft_model(models[1])
    assert len(patch.patched) == 14 and not patch.unpatched  # 7 linear layers a block, 2 blocks: all on our ops
    ids = torch.randint(0, 64, (2, 8))
    grads = []
    for model in models:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad} | {"loss": loss.detach()})
    for name, g in grads[0].items():
        assert g is not None and torch.allclose(grads[1][name], g, rtol=1e-9, atol=1e-12), name
    optimizer = torch.optim.AdamW([p for p in models[1].parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in models[1].named_parameters() if p.requires_grad}
    _step(models[1], optimizer, ids)()  # the timed step: forward, backward, AdamW, zeroed gradients
    assert all(p.grad is None for p in models[1].parameters())
    assert any(not torch.equal(p, before[n]) for n, p in models[1].named_parameters() if p.requires_grad)
    row = {
        "kind": "peft_train",
        "op": method,
        "shape": "tiny",
        "M": 16,
        "provider": "patched",
        "median_us": 2.0,
        "peft_us": 4.0,
        "ratio": 0.5,
        "patched_layers": 14,
        "unpatched_layers": 0,
    }
    assert f"| {method} | tiny | 16 | 4.0 | 2.0 | 0.50 | 14 (+0 on peft) |" in report.peft_train_table([row])
