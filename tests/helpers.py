"""Helpers shared by the tests: devices, backends under test, tolerances, inputs and the float64 oracle."""

import importlib.util

import pytest
import torch

from lowrank_kernels.backend import availability
from lowrank_kernels.ops.lora.naive import lora_linear_ref

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def kernel_backends() -> list[str]:
    """Backends whose kernels the op tests run: the reference always, Triton where it can run here, and the CUDA
    extension on a GPU where it is built (on the CPU, tests/test_cuda_ext.py checks its plumbing, not its math)."""
    backends = ["torch", "triton"] if HAS_TRITON else ["torch"]
    if HAS_CUDA and availability("cuda", torch.device("cuda")) is None:
        backends.append("cuda")
    return backends


def kernel_dtypes(backend: str) -> list[torch.dtype]:
    if backend == "torch":
        return [torch.float64, torch.float32]
    return [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32, torch.float16]


# (backend, dtype, gemm) for every backend and dtype it takes. Above M = 64 the Triton backend has two GEMM
# strategies (our GEMM with the low-rank epilogue, or cuBLAS and a rank-b addmm / the DoRA epilogue:
# ops/lora/triton.py's use_cublas_gemm), both tested, forced through the environment by conftest's ``gemm`` fixture.
BACKEND_CASES = [
    pytest.param(backend, dtype, gemm, id=f"{backend}{'-' + gemm if gemm else ''}-{str(dtype).removeprefix('torch.')}")
    for backend in kernel_backends()
    for gemm in ([None] if backend == "torch" else ["triton", "cublas"])
    for dtype in kernel_dtypes(backend)
]

# Relative L2 error allowed against a float64 oracle. float32 Triton dots run in IEEE fp32 ("ieee"), so 1e-5
# holds; half precision is bounded by input rounding. A dropped rank or term moves the result by >= 10%.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, NaN-poisoned tile?)"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_lora_inputs(M, K, N, R, dtype, *, bias=True, rank_scale=False, lead=(), device=DEVICE, seed=0):
    """Random inputs of well-balanced magnitude: the base and the adapter terms are both O(1) (never zeros)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    x = rnd(*lead, M, K)
    weight = rnd(N, K, std=K**-0.5)
    b = rnd(N) if bias else None
    A = rnd(R, K, std=K**-0.5)
    B = rnd(N, R, std=R**-0.5)
    v = rnd(R) if rank_scale else None
    return x, weight, b, A, B, v


def oracle(x, weight, bias, A, B, v, *, scale, rank, mask=None, grad_rank_start=0, grad_out=None):
    """float64 forward and autograd gradients (x, A, B, v) of the plain formula; frozen ranks zeroed."""
    d = [None if t is None else t.detach().double().requires_grad_() for t in (x, A, B, v)]
    y = lora_linear_ref(d[0], weight.double(), None if bias is None else bias.double(), d[1], d[2], scale, rank,
                        d[3], None if mask is None else mask.double())  # fmt: skip
    if grad_out is None:
        return y.detach(), None
    inputs = [t for t in d if t is not None]
    grads = list(torch.autograd.grad(y, inputs, grad_out.double()))
    if grad_rank_start:
        grads[1][:grad_rank_start] = 0
        grads[2][:, :grad_rank_start] = 0
        if v is not None:
            grads[3][:grad_rank_start] = 0
    return y.detach(), grads


def tiny_llama(vocab_size: int = 64):
    """A 2-layer transformers Llama (hidden 32, seeded random weights, nothing downloaded); needs transformers."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(config)
