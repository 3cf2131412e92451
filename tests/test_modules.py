"""LoRALinear: a drop-in nn.Linear with peft's parameter names, dynamic rank, merge/unmerge."""

import copy
import math

import pytest
import torch
from helpers import DEVICE, REL_TOL, kernel_backends, oracle, rel_err
from torch import nn

from lowrank_kernels import LoRALinear, use_backend


def make_layer(in_f=40, out_f=24, r=8, alpha=16.0, bias=True, dtype=torch.float32, trained=True, **kwargs):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(linear, r, alpha=alpha, **kwargs)
    if trained:  # LoRA's B starts at zero; give it values so the adapter term is visible
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.5)
    return linear, layer


def test_from_linear_shares_and_freezes_the_weight():
    linear, layer = make_layer()
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert (layer.in_features, layer.out_features) == (40, 24)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_peft_parameter_names_and_shapes():
    _, layer = make_layer(r=4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (24, 40), "bias": (24,), "lora_A.weight": (4, 40), "lora_B.weight": (24, 4)}


def test_lora_init_starts_equal_to_the_wrapped_linear():
    linear, layer = make_layer(trained=False)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) on [r, in] gives U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), linear(x))


def test_constructor_makes_its_own_linear():
    layer = LoRALinear(12, 10, r=3, bias=False, dtype=torch.float64)
    assert layer.weight.shape == (10, 12) and layer.bias is None and layer.weight.dtype == torch.float64
    assert layer(torch.randn(2, 12, dtype=torch.float64)).shape == (2, 10)


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_at_each_rank(rslora):
    _, layer = make_layer(r=8, alpha=16.0, rslora=rslora)
    assert layer.active_rank == 8
    for b in (8, 5, 1):
        layer.set_rank(b)
        assert layer.active_rank == b
        assert layer.scaling == pytest.approx(16.0 / (math.sqrt(b) if rslora else b))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("b, frozen", [(8, False), (3, False), (3, True)])
def test_forward_and_grads_match_the_oracle(backend, b, frozen):
    _, layer = make_layer()
    layer.to(DEVICE)  # the kernel backends run on the GPU where there is one
    layer.set_rank(b, frozen=frozen)
    assert layer.frozen == frozen
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = layer(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    y_ref, (dx, dA, dB) = oracle(x, layer.weight, layer.bias, A, B, None, scale=16.0 / b, rank=b,
                                 grad_rank_start=b - 1 if frozen else 0, grad_out=grad_out)  # fmt: skip
    tol = REL_TOL[torch.float32]
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, dx) < tol and rel_err(A.grad, dA) < tol and rel_err(B.grad, dB) < tol
    assert layer.weight.grad is None


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_parametrized_weights_are_read_through_their_parametrization(kind):
    """The forwards read plain parameters straight from ``_parameters`` (host time); a parametrized one is not there
    and must be read through its parametrization, never as the raw original: every tensor doubled by one gives the
    output of a twin whose parameters hold the doubled values."""
    from torch.nn.utils import parametrize

    from lowrank_kernels import AdaLoRALinear, DoRALinear

    torch.manual_seed(0)
    cls = {"lora": LoRALinear, "dora": DoRALinear, "adalora": AdaLoRALinear}[kind]
    layer = cls.from_linear(nn.Linear(40, 24), 8, alpha=16.0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.5)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        for param in twin.parameters():
            param.mul_(2)
    x = torch.randn(3, 40)
    plain = layer(x).detach()
    names = [name for name, _ in layer.named_parameters()]
    for name in names:
        *path, leaf = name.split(".")
        parametrize.register_parametrization(layer.get_submodule(".".join(path)), leaf, _Doubled())
    for mode in (layer.train, layer.eval):  # DoRA: the norm computed, then cached
        mode()
        twin.train(layer.training)
        torch.testing.assert_close(layer(x), twin(x))
    assert rel_err(plain, twin(x)) > 0.1  # doubling shows: reading the originals would fail the check above


def test_dropout_only_in_training_mode():
    linear, layer = make_layer(dropout=0.5)
    x = torch.randn(4, 40)
    layer.eval()
    eval_out = layer(x)
    assert torch.equal(eval_out, layer(x))
    layer.train()
    torch.manual_seed(0)
    train_out = layer(x)
    assert not torch.allclose(train_out, eval_out)
    # The base path sees the undropped x: with B zeroed the layer is exactly the linear, dropout or not.
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    torch.testing.assert_close(layer(x), linear(x))


def test_float32_adapter_on_a_half_base():
    """peft keeps adapters in float32 on a low-precision base; the layer casts them per call."""
    linear, layer = make_layer(dtype=torch.bfloat16)
    layer.lora_A.float()
    layer.lora_B.float()
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_set_rank_rejects_bad_ranks():
    _, layer = make_layer(r=4)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"b must be an int in \[1, 4\]"):
            layer.set_rank(bad)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear.from_linear(nn.Linear(4, 4), 0)
    with pytest.raises(ValueError, match="dropout must be"):
        LoRALinear.from_linear(nn.Linear(4, 4), 2, dropout=1.5)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [8, 3])
def test_merge_unmerge_round_trip(dtype, b):
    linear, layer = make_layer(dtype=dtype)
    layer.set_rank(b)
    original = linear.weight.detach().clone()
    x = torch.randn(5, 40, dtype=dtype)
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged
    merged_out = layer(x)
    assert not torch.equal(linear.weight, original)  # merged in place into the shared weight
    assert rel_err(merged_out, unmerged_out.double()) < (1e-5 if dtype == torch.float32 else 2e-2)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_rank(2)
    layer.unmerge()
    assert not layer.merged
    if dtype == torch.float32:
        torch.testing.assert_close(linear.weight, original, rtol=0, atol=1e-6)
    else:
        assert torch.equal(linear.weight, original)
    torch.testing.assert_close(layer(x), unmerged_out)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merge_refuses_non_finite_adapters():
    linear, layer = make_layer()
    original = linear.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(linear.weight, original)


def test_extra_repr_and_nn_linear_compatibility():
    _, layer = make_layer(r=4)
    text = repr(layer)
    assert "r=4" in text and "active_rank=4" in text and "in_features=40" in text
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(24, 2))
    assert model(torch.randn(3, 40)).shape == (3, 2)
