"""Host overhead per call, on the CPU: the Python work between a module's ``forward`` and its kernel launches.

    pytest benchmarks/test_host_overhead_bench.py --benchmark-only --benchmark-json=host.json
    python benchmarks/report.py host.json

A decode step has ~15 us of GPU work per layer, which checks, dispatch, op plumbing and batch metadata must not
outweigh without CUDA graphs. Every row runs one thread, eval, no grad, x [1, 64] on a 64 -> 64 layer at r = 8
(the arithmetic is negligible), and stores its median beside ``nn.Linear``'s and peft's LoRA layer's from the same
run. ``triton-stubbed`` rows run the Triton backend's whole host path with each kernel launch replaced by a no-op
(launch cost itself excluded): that is what a GPU call pays on top of its launches. Runs on any machine (these rows
are exempt from the benchmarks' no-GPU skip).
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
K = N = 64
R = 8


def _peft_layer() -> nn.Module:
    import peft

    model = peft.get_peft_model(nn.Sequential(nn.Linear(K, N)), peft.LoraConfig(r=R, lora_alpha=16,
                                                                                target_modules=["0"]))  # fmt: skip
    return model.base_model.model[0].eval()


def _pool_layer() -> nn.Module:
    layer = lk.MultiLoRALinear.from_linear(nn.Linear(K, N), capacity=4, max_rank=R)
    layer.add_adapter("a", torch.randn(R, K) / 8, torch.randn(N, R) / 8, alpha=16.0)
    return layer.eval()


def _rows():
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    rows = {
        "nn.Linear": lin,
        "LoRALinear": lk.LoRALinear.from_linear(nn.Linear(K, N), R, alpha=16).eval(),
        "DoRALinear (norm cached)": lk.DoRALinear.from_linear(nn.Linear(K, N), R, alpha=16).eval(),
        "AdaLoRALinear": lk.AdaLoRALinear.from_linear(nn.Linear(K, N), R, alpha=16).eval(),
    }
    if HAS_PEFT:
        rows["peft LoRA layer"] = _peft_layer()
    return rows


ROWS = _rows()
MODULE_ROWS = [pytest.param(name, "torch", id=f"{name}-torch") for name in ROWS]
if HAS_TRITON:
    ours = [name for name, layer in ROWS.items() if type(layer).__module__.startswith("lowrank_kernels")]
    MODULE_ROWS += [pytest.param(name, "triton-stubbed", id=f"{name}-triton-stubbed") for name in ours]


@pytest.fixture
def stubbed_launches(monkeypatch):
    """Replace every Triton kernel of the LoRA and DoRA ops by a no-op launch (outputs stay uninitialised)."""
    from lowrank_kernels.ops.dora import triton as dora_triton
    from lowrank_kernels.ops.lora import triton as lora_triton

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (lora_triton, dora_triton):
        for name in list(vars(module)):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, NoLaunch())


def _record(benchmark, name: str, path: str, fn) -> None:
    torch.set_num_threads(1)
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=200, iterations=20, warmup_rounds=20)
    # The ratios to nn.Linear and peft's layer are taken by benchmarks/report.py from the rows of the same run.
    benchmark.extra_info.update(kind="host", row=name, path=path, median_us=benchmark.stats.stats.median * 1e6)


@pytest.mark.parametrize("name, path", MODULE_ROWS)
def test_module_host_overhead(benchmark, name, path, request):
    layer = ROWS[name]
    x = torch.randn(1, K)
    if path == "triton-stubbed":
        request.getfixturevalue("stubbed_launches")
        with lk.use_backend("triton"):
            _record(benchmark, name, path, lambda: layer(x))
        return
    _record(benchmark, name, path, lambda: layer(x))


def test_multi_lora_host_overhead(benchmark):
    """A mixed-batch layer with the batch built once (serve_batch), as every layer of a model sees it."""
    layer = _pool_layer()
    x = torch.randn(2, K)
    batch = lk.AdapterBatch.build(layer.pool, ["a", None])
    _record(benchmark, "MultiLoRALinear", "torch", lambda: layer(x, batch))


@pytest.mark.parametrize("op", ["lora_linear", "dora_linear"])
def test_functional_op_host_overhead(benchmark, op):
    x, W, bias = torch.randn(1, K), torch.randn(N, K) / 8, torch.randn(N)
    A, B, m = torch.randn(R, K) / 8, torch.randn(N, R) / 8, torch.rand(N) + 0.5
    norm = lk.dora_weight_norm(W, A, B, scale=2.0)
    if op == "lora_linear":
        _record(benchmark, op, "torch", lambda: lk.lora_linear(x, W, bias, A, B, scale=2.0))
    else:
        _record(benchmark, op, "torch", lambda: lk.dora_linear(x, W, bias, A, B, m, scale=2.0, weight_norm=norm))
