"""lora_linear's forward and every gradient against the float64 oracle, on every backend that runs here.

On CPU the Triton kernels run under the interpreter (small shapes, float32/float16); on a GPU the same cases run
on the device, plus the GPU-marked realistic sizes in bf16 at the bottom.
"""

import pytest
import torch
from helpers import BACKEND_CASES, HAS_CUDA, REL_TOL, kernel_backends, make_lora_inputs, oracle, rel_err

from lowrank_kernels import dropout_mask, lora_linear, use_backend

SCALE = 0.75

# (M, K, N, R, b): decode sizes (M <= 64, one fused launch) and prefill sizes (shrink + GEMM), odd everything.
SHAPES = [
    pytest.param(1, 70, 33, 8, 8, id="M1-K70-N33-r8-b8"),
    pytest.param(7, 70, 33, 8, 5, id="M7-K70-N33-r8-b5"),
    pytest.param(63, 37, 50, 16, 16, id="M63-K37-N50-r16-b16"),
    pytest.param(64, 70, 33, 64, 33, id="M64-K70-N33-r64-b33"),
    pytest.param(65, 40, 24, 4, 1, id="M65-K40-N24-r4-b1"),
    pytest.param(130, 70, 33, 24, 17, id="M130-K70-N33-r24-b17"),
    pytest.param(7, 16, 16, 1, 1, id="M7-K16-N16-r1-b1"),
    pytest.param(9, 33, 21, 130, 129, id="M9-K33-N21-r130-b129"),  # rank > 128: decode without the fused shrink
]


def run_and_check(backend, dtype, M, K, N, R, b, *, bias=True, rank_scale=False, dropout=0.0, frozen=False,
                  lead=(), transform_x=None, seed=0):  # fmt: skip
    x, weight, bias_t, A, B, v = make_lora_inputs(M, K, N, R, dtype, bias=bias, rank_scale=rank_scale, lead=lead)
    if transform_x is not None:
        x = transform_x(x)
    params = [t.requires_grad_() for t in (x, A, B, v) if t is not None]
    with use_backend(backend):
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE, rank=b, rank_scale=v, dropout=dropout, frozen=frozen,
                        seed=1234 if dropout else None)  # fmt: skip
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    mask = dropout_mask(1234, (x.reshape(-1, K).shape[0], K), dropout, x.device).reshape(x.shape) if dropout else None
    y_ref, grads_ref = oracle(x, weight, bias_t, A, B, v, scale=SCALE, rank=b, mask=mask,
                              grad_rank_start=b - 1 if frozen else 0, grad_out=grad_out)  # fmt: skip
    tol = REL_TOL[dtype]
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    assert rel_err(y, y_ref) < tol
    for name, g, g_ref in zip(["x", "lora_A", "lora_B", "rank_scale"], grads, grads_ref, strict=False):
        assert g.dtype == dtype, name
        assert rel_err(g, g_ref) < tol, name
    # Ranks past b (and, frozen, before b - 1) get exactly zero gradient, not merely a small one.
    dA, dB = grads[1], grads[2]
    lo = b - 1 if frozen else 0
    assert torch.count_nonzero(dA[b:]) == 0 and torch.count_nonzero(dB[:, b:]) == 0
    assert torch.count_nonzero(dA[:lo]) == 0 and torch.count_nonzero(dB[:, :lo]) == 0
    assert torch.count_nonzero(dA[lo:b]) > 0 and torch.count_nonzero(dB[:, lo:b]) > 0
    return y


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, K, N, R, b", SHAPES)
def test_forward_backward(backend, dtype, gemm, M, K, N, R, b, poison_empty):
    run_and_check(backend, dtype, M, K, N, R, b)


VARIANTS = [
    pytest.param(dict(bias=False), id="nobias"),
    pytest.param(dict(rank_scale=True), id="rank_scale"),
    pytest.param(dict(frozen=True), id="frozen"),
    pytest.param(dict(dropout=0.3), id="dropout"),
    pytest.param(dict(dropout=0.2, frozen=True, rank_scale=True), id="dropout-frozen-rank_scale"),
    pytest.param(dict(lead=(3,)), id="3d"),
    pytest.param(dict(lead=(2, 2)), id="4d"),
    pytest.param(dict(transform_x=lambda x: x.t().contiguous().t()), id="x-column-major"),
]


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, b", [pytest.param(5, 3, id="decode-M5"), pytest.param(70, 6, id="prefill-M70")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(backend, dtype, gemm, M, b, variant, poison_empty):
    run_and_check(backend, dtype, M, 37, 29, 8, b, **variant)


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M", [5, 70])
def test_strided_input(backend, dtype, gemm, M, poison_empty):
    """A 2-D view with column stride 2 reaches the kernels as is: its strides must be honoured."""
    K, b = 37, 6
    wide, weight, bias_t, A, B, _ = make_lora_inputs(M, 2 * K, 29, 8, dtype)
    _, weight, bias_t, A, B, _ = make_lora_inputs(M, K, 29, 8, dtype, seed=1)
    x = wide[:, ::2]
    assert x.stride() == (2 * K, 2)
    params = [t.requires_grad_() for t in (x, A, B)]
    with use_backend(backend):
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE, rank=b)
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    y_ref, grads_ref = oracle(x, weight, bias_t, A, B, None, scale=SCALE, rank=b, grad_out=grad_out)
    assert rel_err(y, y_ref) < REL_TOL[dtype]
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < REL_TOL[dtype]


@pytest.mark.parametrize("backend", kernel_backends())
def test_tolerance_catches_a_wrong_rank(backend):
    """The comparison used above is tight enough that rank b - 1 or a dropped bias cannot pass for rank b."""
    dtype = torch.float16 if backend == "triton" else torch.float32
    x, weight, bias_t, A, B, _ = make_lora_inputs(7, 70, 33, 8, dtype)
    with use_backend(backend):
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE, rank=5)
    y_wrong_rank, _ = oracle(x, weight, bias_t, A, B, None, scale=SCALE, rank=4)
    y_no_bias, _ = oracle(x, weight, None, A, B, None, scale=SCALE, rank=5)
    assert rel_err(y, y_wrong_rank) > 10 * REL_TOL[dtype]
    assert rel_err(y, y_no_bias) > 10 * REL_TOL[dtype]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("seed", [1, 7])  # 1: Triton would specialise an int argument equal to 1 into a constexpr
def test_dropout_mask_is_shared_and_reproducible(backend, seed):
    """Same seed -> same output; the mask drops about p of the entries; backends agree on the mask bit for bit."""
    x, weight, bias_t, A, B, _ = make_lora_inputs(40, 64, 24, 8, torch.float32)
    with use_backend(backend):
        y1 = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=0.25, seed=seed)
        y2 = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=0.25, seed=seed)
        y3 = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=0.25, seed=seed + 1)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    mask = dropout_mask(seed, (40, 64), 0.25, x.device)
    assert abs((mask == 0).float().mean().item() - 0.25) < 0.03
    assert torch.all((mask == 0) | (mask == torch.tensor(1 / 0.75, dtype=torch.float32)))
    if backend == "triton":
        from lowrank_kernels.ops.lora.triton import dropout_mask as kernel_mask

        assert torch.equal(kernel_mask(seed, (40, 64), 0.25, x.device), mask)


def test_default_seed_follows_torch_manual_seed():
    x, weight, bias_t, A, B, _ = make_lora_inputs(6, 32, 16, 4, torch.float32)
    torch.manual_seed(3)
    y1 = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=0.5)
    torch.manual_seed(3)
    y2 = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=0.5)
    y3 = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)


@pytest.mark.parametrize("backend", kernel_backends())
def test_rank_change_never_recompiles(backend):
    """b is a runtime argument: sweeping it compiles the kernels once (Triton's cache does not grow)."""
    x, weight, bias_t, A, B, _ = make_lora_inputs(70, 40, 24, 16, torch.float32)
    with use_backend(backend):
        lora_linear(x, weight, bias_t, A, B, scale=SCALE, rank=16)
        if backend == "triton" and HAS_CUDA:
            from lowrank_kernels.ops.lora import triton as kernels

            sizes = [len(k.device_caches[0][0]) for k in (kernels.lora_matmul_kernel, kernels.lora_shrink_kernel)]
        for b in (1, 3, 8, 15):
            y = lora_linear(x, weight, bias_t, A, B, scale=SCALE, rank=b)
            y_ref, _ = oracle(x, weight, bias_t, A, B, None, scale=SCALE, rank=b)
            assert rel_err(y, y_ref) < REL_TOL[torch.float32]
        if backend == "triton" and HAS_CUDA:
            after = [len(k.device_caches[0][0]) for k in (kernels.lora_matmul_kernel, kernels.lora_shrink_kernel)]
            assert after == sizes


@pytest.mark.parametrize("backend", kernel_backends())
def test_frozen_base_weight_and_bias_gradients_when_trainable(backend):
    """A caller who leaves W0 / bias trainable still gets their plain gradients (not silently None)."""
    x, weight, bias_t, A, B, _ = make_lora_inputs(9, 24, 16, 4, torch.float32)
    for t in (x, weight, bias_t, A, B):
        t.requires_grad_()
    with use_backend(backend):
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE)
    grad_out = torch.randn_like(y)
    dW, db = torch.autograd.grad(y, (weight, bias_t), grad_out)
    assert rel_err(dW, grad_out.double().t() @ x.double()) < REL_TOL[torch.float32]
    assert rel_err(db, grad_out.double().sum(0)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("backend", kernel_backends())
def test_empty_batch(backend):
    x, weight, bias_t, A, B, _ = make_lora_inputs(0, 24, 16, 4, torch.float32)
    x.requires_grad_()
    with use_backend(backend):
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE)
        y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 24)


# ---- GPU: realistic sizes in every dtype (run by scripts/gpu_run.sh on the lent device) ------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "M, K, N, R, b",
    [
        pytest.param(1, 4096, 4096, 16, 16, id="M1-4096x4096-r16"),
        pytest.param(16, 4096, 11008, 64, 8, id="M16-4096x11008-r64-b8"),
        pytest.param(64, 11008, 4096, 64, 64, id="M64-11008x4096-r64"),
        pytest.param(2048, 4096, 4096, 16, 16, id="M2048-4096x4096-r16"),
        pytest.param(2049, 4096, 11008, 64, 8, id="M2049-4096x11008-r64-b8"),
    ],
)
@pytest.mark.parametrize("variant", [{}, dict(dropout=0.1), dict(frozen=True)], ids=["plain", "dropout", "frozen"])
def test_gpu_realistic(dtype, M, K, N, R, b, variant, poison_empty):
    run_and_check("triton", dtype, M, K, N, R, b, **variant)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_int64_offsets():
    """M * K past 2^31 elements: offsets must be 64-bit (a wild read would corrupt the last rows)."""
    M, K, N, R = 2**31 // 4096 + 64, 4096, 64, 16
    x, weight, bias_t, A, B, _ = make_lora_inputs(M, K, N, R, torch.bfloat16)
    with use_backend("triton"):
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE)
    tail = slice(M - 64, M)
    y_ref, _ = oracle(x[tail], weight, bias_t, A, B, None, scale=SCALE, rank=R)
    assert rel_err(y[tail], y_ref) < REL_TOL[torch.bfloat16]


@pytest.mark.skipif("triton" not in kernel_backends(), reason="Triton not installed")
def test_gemm_strategy_choice(monkeypatch):
    from lowrank_kernels.ops.lora.triton import CUBLAS_GEMM_MIN_M, GEMM_ENV_VAR, use_cublas_gemm

    monkeypatch.delenv(GEMM_ENV_VAR, raising=False)
    assert not use_cublas_gemm(CUBLAS_GEMM_MIN_M - 1) and use_cublas_gemm(CUBLAS_GEMM_MIN_M)
    monkeypatch.setenv(GEMM_ENV_VAR, "triton")
    assert not use_cublas_gemm(8192)
    monkeypatch.setenv(GEMM_ENV_VAR, "cuBLAS")
    assert use_cublas_gemm(1)
    monkeypatch.setenv(GEMM_ENV_VAR, "magma")
    with pytest.raises(ValueError, match=GEMM_ENV_VAR):
        use_cublas_gemm(1)
