"""Shared test setup.

Without a GPU, the Triton kernels run under Triton's CPU interpreter: TRITON_INTERPRET must be set before any
kernel is decorated, i.e. before ``lowrank_kernels.ops.*.triton`` is imported (the package imports it lazily).
The interpreter's bf16 ``tl.dot`` is broken (~1e10), so interpreter cases use float32 / float16; bf16 runs on the GPU.
Helpers the tests import live in ``helpers.py`` (a module named conftest would clash with benchmarks/conftest.py).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poison_empty(monkeypatch):
    """NaN-fill fresh floating-point allocations (as fla's tests do), so an unwritten tile fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def seeded_rng():
    """Every test starts from the same torch RNG state, so its random inputs (``torch.randn_like(y)`` gradients) do
    not depend on which tests ran before it: a tolerance that holds once holds every time."""
    torch.manual_seed(0)


@pytest.fixture
def gemm(request, monkeypatch):
    """Forces the Triton backend's GEMM strategy for the test (the ``gemm`` parameter of helpers.BACKEND_CASES)."""
    if request.param is not None:
        monkeypatch.setenv("LOWRANK_KERNELS_LORA_GEMM", request.param)
    return request.param
