"""Edge cases that once gave wrong numbers silently: empty dimensions, DoRA's cancelling row norm, in-place ops on a
layer's output, float64 end to end."""

import pytest
import torch
from helpers import DEVICE, REL_TOL, kernel_backends, make_lora_inputs, rel_err
from torch import nn

from lowrank_kernels import (
    AdaLoRALinear,
    DoRALinear,
    LoRALinear,
    dora_linear,
    dora_weight_norm,
    lora_linear,
    use_backend,
)
from lowrank_kernels.ops.dora.naive import dora_linear_ref


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("M, K, N", [(0, 6, 5), (4, 0, 5), (4, 6, 0), (0, 0, 0)], ids=["M0", "K0", "N0", "all0"])
def test_empty_dimensions_match_nn_linear(M, K, N, op, backend):
    """Every empty dimension gives what F.linear gives (K = 0: the bias), with gradients of the right shapes."""
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    weight, bias = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    A = torch.randn(3, K, device=DEVICE, requires_grad=True)
    B = torch.randn(N, 3, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        if op == "lora":
            y = lora_linear(x, weight, bias, A, B, scale=2.0)
            params = (x, A, B)
        else:
            m = (torch.rand(N, device=DEVICE) + 0.5).requires_grad_()
            y = dora_linear(x, weight, bias, A, B, m, scale=2.0, weight_norm=torch.ones(N, device=DEVICE))
            params = (x, A, B, m)
        grads = torch.autograd.grad(y.sum(), params, allow_unused=True)
    expected = nn.functional.linear(x.detach(), weight, bias)
    if op == "dora":
        expected = m.detach() * nn.functional.linear(x.detach(), weight) + bias
    torch.testing.assert_close(y, expected)
    for p, g in zip(params, grads, strict=True):
        assert g is None or g.shape == p.shape


@pytest.mark.parametrize("backend", kernel_backends())
def test_dora_norm_that_cancels_is_computed_directly(backend):
    """``W0 + s B A`` nearly 0 in a row: the factored sum ||W0||^2 + 2s<B, U> + s^2 B G B^T cancels to 0 in float32
    (y = inf before), the direct norm does not. K = 64 with W0 ~ -sBA + 1e-3 noise: 1.4% off before, now ~1e-6."""
    W, A, B = torch.tensor([[0.5]]), torch.tensor([[0.5]]), torch.tensor([[-0.49999]])
    direct = (W + 2.0 * B @ A).abs().double().flatten()
    with use_backend(backend):
        norm = dora_weight_norm(W.to(DEVICE), A.to(DEVICE), B.to(DEVICE), scale=2.0)
    assert rel_err(norm, direct) < 1e-3
    g = torch.Generator().manual_seed(0)
    K, N, R, s = 64, 48, 4, 2.0
    A = torch.randn(R, K, generator=g) / K**0.5
    B = torch.randn(N, R, generator=g)
    W = -s * (B @ A) + 1e-3 * torch.randn(N, K, generator=g)
    W[::2] = torch.randn(N // 2, K, generator=g) / K**0.5  # half the rows do not cancel: both paths in one call
    direct = torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1)
    with use_backend(backend):
        for cache in (None, W.double().square().sum(1).float()):
            norm = dora_weight_norm(W.to(DEVICE), A.to(DEVICE), B.to(DEVICE), scale=s,
                                    weight_norm_sq=None if cache is None else cache.to(DEVICE))  # fmt: skip
            assert (norm.cpu().double() - direct).abs().div(direct).max() < 1e-4


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["eval-form", "dropout-form"])
@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_in_place_ops_on_the_output_are_allowed(kind, dropout, backend):
    """A drop-in nn.Linear allows what nn.Linear allows: Falcon's ``mlp_output += attention_output``."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 16).to(DEVICE)
    cls = {"lora": LoRALinear, "dora": DoRALinear, "adalora": AdaLoRALinear}[kind]
    layer = cls.from_linear(linear, 4, alpha=8.0, dropout=dropout)
    layer.train()
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = layer(x)
        y += 1.0
        y.mul_(2.0)
        y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_float64_stays_float64_end_to_end():
    """float64 is the oracle dtype: DoRA's trainable-base gradient and every output stay float64 (1e-7 off before)."""
    x, weight, bias, A, B, _ = make_lora_inputs(6, 20, 12, 4, torch.float64)
    m = torch.rand(12, dtype=torch.float64, device=DEVICE) + 0.5
    params = [t.requires_grad_() for t in (x, weight, bias, A, B, m)]
    for dropout in (0.0, 0.3):
        y = dora_linear(x, weight, bias, A, B, m, scale=1.5, dropout=dropout, seed=3)
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
        from lowrank_kernels.ops.lora.naive import dropout_mask

        mask = dropout_mask(3, tuple(x.shape), dropout, x.device).double() if dropout else None
        y_ref = dora_linear_ref(x, weight, bias, A, B, m, 1.5, None, mask)
        grads_ref = torch.autograd.grad(y_ref, params, grad_out)
        assert y.dtype == torch.float64 and rel_err(y, y_ref) < REL_TOL[torch.float64]
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert g.dtype == torch.float64 and rel_err(g, g_ref) < REL_TOL[torch.float64]


def test_float64_pool_keeps_float64_row_scales():
    """A float64 pool's per-row scale ``alpha / b`` stays float64 (it was float32: 1.2e-8 off at alpha / b = 8 / 3)."""
    from lowrank_kernels import AdapterBatch, AdapterPool, multi_lora_linear
    from lowrank_kernels.ops.multi_lora.naive import multi_lora_linear_ref

    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(20, 12, dtype=torch.float64).to(DEVICE)
    pool = AdapterPool.for_linear(linear, 2, 3)
    A, B = torch.randn(3, 20, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    pool.add("a", A.to(DEVICE), B.to(DEVICE), alpha=8.0)
    ids = [0, -1, 0]
    batch = AdapterBatch.build(pool, ids)
    assert batch.row_scale.dtype == torch.float64
    x = torch.randn(3, 20, generator=g, dtype=torch.float64).to(DEVICE)
    y = multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    y_ref = multi_lora_linear_ref(x, linear.weight, linear.bias, ids, [pool.weights("a")])
    assert rel_err(y, y_ref) < REL_TOL[torch.float64]
