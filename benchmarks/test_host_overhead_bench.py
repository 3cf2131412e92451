"""Host overhead per call, on the CPU: the Python work between a module's ``forward`` and its kernel launches.

    pytest benchmarks/test_host_overhead_bench.py --benchmark-only --benchmark-json=host.json
    python benchmarks/report.py host.json

A decode step has ~15 us of GPU work per layer, which checks, dispatch, op plumbing and batch metadata must not
outweigh without CUDA graphs. Every row runs one thread, eval, no grad, at two sizes: ``decode`` (x [1, 64] on a
64 -> 64 layer at r = 8: the arithmetic is negligible, the row is host overhead) and ``prefill`` (x [64, 1024],
1024 -> 1024, r = 16, float32: the CPU path's arithmetic). Each of our modules is stored beside ``nn.Linear`` and its
peft counterpart (``peer``: peft's LoRA, DoRA or AdaLoRA layer, or peft's ``adapter_names=`` mixed batch for
``MultiLoRALinear``) from the same run. ``triton-stubbed`` rows run the Triton backend's whole host path with each
kernel launch replaced by a no-op (launch cost itself excluded): what a GPU call pays on top of its launches. Runs on
any machine (these rows are exempt from the benchmarks' no-GPU skip).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("TRITON_INTERPRET", "1")  # the stubbed Triton rows run on CPU tensors (nothing is launched)

import lowrank_kernels as lk  # noqa: E402

pytestmark = pytest.mark.host
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
SIZES = {"decode": (1, 64, 64, 8), "prefill": (64, 1024, 1024, 16)}  # M, K, N, r
PEERS = {"LoRALinear": "peft LoRA layer", "DoRALinear (norm cached)": "peft DoRA layer",
         "AdaLoRALinear": "peft AdaLoRA layer", "MultiLoRALinear": "peft mixed batch"}  # fmt: skip


def _peft_layers(K: int, N: int, r: int) -> dict[str, nn.Module]:
    import peft

    def layer(config) -> nn.Module:
        return peft.get_peft_model(nn.Sequential(nn.Linear(K, N)), config).base_model.model[0].eval()

    lora = dict(r=r, lora_alpha=16, target_modules=["0"])
    mixed = peft.get_peft_model(nn.Sequential(nn.Linear(K, N)), peft.LoraConfig(**lora))
    mixed.add_adapter("b", peft.LoraConfig(**lora))
    return {
        "peft LoRA layer": layer(peft.LoraConfig(**lora)),
        "peft DoRA layer": layer(peft.LoraConfig(**lora, use_dora=True)),
        "peft AdaLoRA layer": layer(
            peft.AdaLoraConfig(init_r=r, target_r=r, lora_alpha=16, target_modules=["0"], total_step=10)
        ),  # fmt: skip
        "peft mixed batch": mixed.base_model.model[0].eval(),
    }


def _rows(K: int, N: int, r: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    pool = lk.MultiLoRALinear.from_linear(nn.Linear(K, N), capacity=4, max_rank=r)
    pool.add_adapter("a", torch.randn(r, K) / 8, torch.randn(N, r) / 8, alpha=16.0)
    pool.add_adapter("b", torch.randn(r, K) / 8, torch.randn(N, r) / 8, alpha=16.0)
    rows = {
        "nn.Linear": nn.Linear(K, N),
        "LoRALinear": lk.LoRALinear.from_linear(nn.Linear(K, N), r, alpha=16).eval(),
        "DoRALinear (norm cached)": lk.DoRALinear.from_linear(nn.Linear(K, N), r, alpha=16).eval(),
        "AdaLoRALinear": lk.AdaLoRALinear.from_linear(nn.Linear(K, N), r, alpha=16).eval(),
        "MultiLoRALinear": pool.eval(),
    }
    return rows | (_peft_layers(K, N, r) if HAS_PEFT else {})


ROWS = {size: _rows(K, N, r) for size, (_, K, N, r) in SIZES.items()}
MIXED = {"MultiLoRALinear", "peft mixed batch"}  # half the rows on each of two adapters (one call, ids per row)
MODULE_ROWS = [pytest.param(size, name, "torch", id=f"{size}-{name}-torch") for size in SIZES for name in ROWS[size]]
if HAS_TRITON:
    MODULE_ROWS += [pytest.param(size, name, "triton-stubbed", id=f"{size}-{name}-triton-stubbed")
                    for size in SIZES for name, layer in ROWS[size].items()
                    if type(layer).__module__.startswith("lowrank_kernels")]  # fmt: skip


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Replace every Triton kernel of the ops by a no-op launch (outputs stay uninitialised)."""
    from lowrank_kernels.ops.dora import triton as dora_triton
    from lowrank_kernels.ops.lora import triton as lora_triton
    from lowrank_kernels.ops.multi_lora import triton as multi_lora_triton

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (lora_triton, dora_triton, multi_lora_triton):
        for name in list(vars(module)):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, NoLaunch())


def _record(benchmark, size: str, name: str, path: str, fn) -> None:
    torch.set_num_threads(1)
    rounds = 200 if size == "decode" else 20
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, iterations=20, warmup_rounds=max(2, rounds // 10))
    # The ratios to nn.Linear and the peft peer are taken by benchmarks/report.py from the rows of the same run.
    benchmark.extra_info.update(kind="host", size=size, row=name, path=path, peer=PEERS.get(name),
                                median_us=benchmark.stats.stats.median * 1e6)  # fmt: skip


def _call(size: str, name: str):
    layer, (M, K, _, _) = ROWS[size][name], SIZES[size]
    x = torch.randn(M, K)
    if name == "MultiLoRALinear":
        batch = lk.AdapterBatch.build(layer.pool, ["a", "b"] * (M // 2) or ["a"])  # built once per step, as serving
        return lambda: layer(x, batch)
    if name == "peft mixed batch":
        names = ["default", "b"] * (M // 2) or ["default"]
        return lambda: layer(x, adapter_names=names)
    return lambda: layer(x)


@pytest.mark.parametrize("size, name, path", MODULE_ROWS)
def test_module_host_overhead(benchmark, size, name, path, request):
    fn = _call(size, name)
    if path == "triton-stubbed":
        request.getfixturevalue("stubbed_launches")
        with lk.use_backend("triton"):
            _record(benchmark, size, name, path, fn)
        return
    _record(benchmark, size, name, path, fn)


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_functional_op_host_overhead(benchmark, op):
    M, K, N, R = SIZES["decode"]
    x, W, bias = torch.randn(M, K), torch.randn(N, K) / 8, torch.randn(N)
    A, B, m = torch.randn(R, K) / 8, torch.randn(N, R) / 8, torch.rand(N) + 0.5
    norm = lk.dora_weight_norm(W, A, B, scale=2.0)
    if op == "lora_linear":
        _record(benchmark, "decode", op, "torch", lambda: lk.lora_linear(x, W, bias, A, B, scale=2.0))
    else:
        _record(benchmark, "decode", op, "torch",
                lambda: lk.dora_linear(x, W, bias, A, B, m, scale=2.0, weight_norm=norm))  # fmt: skip
