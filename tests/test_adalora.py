"""AdaLoRA: AdaLoRALinear (peft's SVDLinear on the fused op, masked triplets skipped), RankAllocator, orth_reg."""

from __future__ import annotations

import copy
import importlib.util
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, REL_TOL, kernel_backends, kernel_dtypes, rel_err
from torch import nn

import lowrank_kernels.modules.adalora as adalora_module
from lowrank_kernels import dropout_mask, use_backend
from lowrank_kernels.modules.adalora import AdaLoRALinear
from lowrank_kernels.training.adalora import AdaLoRAConfig, RankAllocator, orth_reg

IN, OUT, R = 37, 50, 9  # odd sizes: no tile divides them


def make_layer(in_f=IN, out_f=OUT, r=R, alpha=8.0, dtype=torch.float32, keep=None, lambda_grad=False, device=None,
               **kwargs):  # fmt: skip
    """A layer with trained-looking values (lambda is zeros at init) and, optionally, a triplet mask applied the
    way the allocator applies it: masked lambda zeroed, the layer told to skip them."""
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, dtype=dtype, device=device)
    layer = AdaLoRALinear.from_linear(linear, r, alpha=alpha, **kwargs)
    with torch.no_grad():
        layer.lora_A.normal_(0, in_f**-0.5)
        layer.lora_B.normal_(0, 1.0)
        layer.lora_E.normal_(0, 1.0)
    if keep is not None:
        keep = torch.tensor(keep, dtype=torch.bool)
        with torch.no_grad():
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        layer.set_triplet_mask(keep, lambda_grad=lambda_grad)
    return linear, layer


def peft_oracle(layer, x, grad_out, mask=None):
    """float64 output and autograd gradients (x, Q, P, lambda) of peft's SVDLinear forward, every triplet computed:
    ``x W0^T + bias + (drop(x) (A * E)^T) B^T * scaling / (ranknum + 1e-5)``."""
    xd, A, B, E = (t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B, layer.lora_E))
    x_adapter = xd if mask is None else xd * mask.double().reshape(xd.shape)
    bias = None if layer.bias is None else layer.bias.double()
    scale = layer.scaling / (layer.ranknum.double() + 1e-5)
    y = F.linear(xd, layer.weight.double(), bias) + (x_adapter @ (A * E).t() @ B.t()) * scale
    return y.detach(), torch.autograd.grad(y, (xd, A, B, E), grad_out.double())


# ---- the layer -------------------------------------------------------------------------------------------------


def test_from_linear_peft_names_shapes_and_init():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = AdaLoRALinear.from_linear(linear, 12)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad and not layer.ranknum.requires_grad
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (48, 64), "bias": (48,), "lora_A": (12, 64), "lora_E": (12, 1), "lora_B": (48, 12),
                      "ranknum": (1,)}  # fmt: skip
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B", "lora_E"]
    # peft's defaults and init: alpha 8, scaling = alpha, ranknum = r, lambda zeros, P and Q normal(0, 0.02)
    assert layer.scaling == 8.0 and layer.ranknum.item() == 12.0 and layer.lora_dropout == 0.0
    assert layer.scale == pytest.approx(8.0 / (12 + 1e-5), rel=1e-12)
    assert torch.count_nonzero(layer.lora_E) == 0
    for p in (layer.lora_A, layer.lora_B):
        assert abs(p.mean().item()) < 0.004 and 0.017 < p.std().item() < 0.023
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), linear(x))
    assert AdaLoRALinear.from_linear(nn.Linear(4, 4), 3, alpha=0).scaling == 3.0  # peft: r when alpha <= 0


def test_constructor_and_bad_arguments():
    layer = AdaLoRALinear(12, 10, r=3, bias=False, dtype=torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.bias is None
    assert layer(torch.randn(2, 12, dtype=torch.float64)).shape == (2, 10)
    with pytest.raises(ValueError, match="r must be"):
        AdaLoRALinear.from_linear(nn.Linear(4, 4), 0)
    with pytest.raises(ValueError, match="dropout must be"):
        AdaLoRALinear.from_linear(nn.Linear(4, 4), 2, dropout=1.0)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        AdaLoRALinear.from_linear(nn.Conv1d(4, 4, 1), 2)
    with pytest.raises(ValueError, match="bool mask of 9"):
        make_layer()[1].set_triplet_mask(torch.ones(8, dtype=torch.bool))


def test_ranknum_from_a_loaded_state_dict_sets_the_scale():
    _, layer = make_layer(r=4)
    state = layer.state_dict()
    state["ranknum"] = torch.tensor([2.0])
    layer.load_state_dict(state)
    assert layer.scale == pytest.approx(8.0 / (2 + 1e-5))


SCATTERED = [True, False, True, True, False, False, True, False, True]  # 5 of 9 kept, not a prefix
PREFIX = [True] * 4 + [False] * 5
MASKS = {"none": None, "scattered": SCATTERED, "prefix": PREFIX, "allmasked": [False] * R}


def _fwd_bwd_cases():
    for backend in kernel_backends():
        for dtype in kernel_dtypes(backend):
            wide = dtype in (torch.float64, torch.float32)
            for mask_name in MASKS if wide else ("none", "scattered"):
                for lambda_grad in (False, True) if MASKS[mask_name] is not None else (False,):
                    if lambda_grad and not wide:
                        continue
                    tag = f"{backend}-M14-K{IN}-N{OUT}-r{R}-{mask_name}{'-lgrad' if lambda_grad else ''}-{dtype}"
                    yield pytest.param(backend, dtype, mask_name, lambda_grad, id=tag.replace("torch.", ""))


@pytest.mark.parametrize("backend, dtype, mask_name, lambda_grad", list(_fwd_bwd_cases()))
def test_forward_and_grads_match_peft(backend, dtype, mask_name, lambda_grad, poison_empty):
    keep = MASKS[mask_name]
    _, layer = make_layer(dtype=dtype, keep=keep, lambda_grad=lambda_grad, device=DEVICE)
    x = torch.randn(2, 7, IN, dtype=dtype, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = layer(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    y_ref, (dx, dA, dB, dE) = peft_oracle(layer, x, grad_out)
    if mask_name == "allmasked" and not lambda_grad:  # the adapter was not run: no gradient (peft's: zeros)
        assert layer.lora_A.grad is None and layer.lora_B.grad is None and layer.lora_E.grad is None
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.grad = torch.zeros_like(p)
    if keep is not None and not lambda_grad:  # skipped entirely: masked lambda gets no gradient (peft's does)
        dE = dE * torch.tensor(keep, dtype=torch.float64, device=dE.device).view(-1, 1)
    tol = REL_TOL[dtype]
    assert rel_err(y, y_ref) < tol and rel_err(x.grad, dx) < tol
    assert rel_err(layer.lora_A.grad, dA) < tol and rel_err(layer.lora_B.grad, dB) < tol
    assert rel_err(layer.lora_E.grad, dE) < tol
    if keep is not None:
        masked = ~torch.tensor(keep)
        assert torch.count_nonzero(layer.lora_A.grad[masked]) == 0  # exactly zero, as peft's with lambda_i = 0
        assert torch.count_nonzero(layer.lora_B.grad[:, masked]) == 0
        if lambda_grad:
            assert torch.count_nonzero(layer.lora_E.grad[masked]) == int(masked.sum())  # peft's: non-zero
    assert layer.weight.grad is None


@pytest.mark.parametrize("backend", kernel_backends())
def test_masked_lambda_grad_with_dropout(backend, monkeypatch):
    """The masked-lambda backward rebuilds the very dropout mask lora_linear applied (same seed)."""
    seeds = []
    real = adalora_module.lora_linear

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(adalora_module, "lora_linear", spy)
    _, layer = make_layer(keep=SCATTERED, lambda_grad=True, dropout=0.3, device=DEVICE)
    layer.train()
    x = torch.randn(13, IN, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = layer(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    mask = dropout_mask(seeds[0], (13, IN), 0.3, DEVICE)
    y_ref, (dx, dA, dB, dE) = peft_oracle(layer, x, grad_out, mask=mask)
    tol = REL_TOL[torch.float32]
    assert rel_err(y, y_ref) < tol and rel_err(x.grad, dx) < tol and rel_err(layer.lora_E.grad, dE) < tol
    assert rel_err(layer.lora_A.grad, dA) < tol and rel_err(layer.lora_B.grad, dB) < tol


@pytest.mark.parametrize(
    "keep, expect",
    [
        pytest.param(None, ("param", R), id="none-full-rank"),
        pytest.param(PREFIX, ("param", 4), id="prefix-truncated-rank"),
        pytest.param(SCATTERED, ("gathered", None), id="scattered-gathered"),
        pytest.param([False] * R, None, id="allmasked-no-adapter-call"),
    ],
)
def test_masked_triplets_are_not_computed(keep, expect, monkeypatch):
    calls = []
    real = adalora_module.lora_linear

    def spy(x, weight, bias, lora_A, lora_B, **kwargs):
        calls.append((lora_A, lora_B, kwargs["rank_scale"], kwargs["rank"]))
        return real(x, weight, bias, lora_A, lora_B, **kwargs)

    monkeypatch.setattr(adalora_module, "lora_linear", spy)
    _, layer = make_layer(keep=keep)
    layer(torch.randn(4, IN))
    if expect is None:
        assert calls == []
        return
    (A, B, v, rank), = calls  # fmt: skip
    kind, expected_rank = expect
    if kind == "param":  # no gather: the parameters themselves, at the truncated rank
        assert A.data_ptr() == layer.lora_A.data_ptr() and B.data_ptr() == layer.lora_B.data_ptr()
        assert rank == expected_rank
    else:  # the kept triplets only: the op runs at rank 5
        n_kept = sum(keep)
        assert A.shape == (n_kept, IN) and B.shape == (OUT, n_kept) and v.shape == (n_kept,) and rank is None
        idx = torch.tensor(keep).nonzero().view(-1)
        assert torch.equal(A, layer.lora_A[idx]) and torch.equal(v, layer.lora_E.view(-1)[idx])
    assert layer.active_rank == (sum(keep) if keep else R)


def test_masked_triplet_contributes_nothing_whatever_its_lambda():
    """The mask is part of the op (DESIGN §3: lambda * mask): a stale non-zero lambda of a masked triplet is ignored
    by the forward and by merge, never half-applied."""
    _, layer = make_layer(keep=SCATTERED)
    x = torch.randn(6, IN)
    y_masked = layer(x)
    with torch.no_grad():
        layer.lora_E[1] = 5.0  # masked triplet
    torch.testing.assert_close(layer(x), y_masked)
    layer.zero_masked_lambda()
    assert layer.lora_E[1].item() == 0.0
    layer.set_triplet_mask(None)
    assert layer.triplet_mask is None and layer.active_rank == R
    torch.testing.assert_close(layer(x), y_masked)  # masked lambda are zero: computing them changes nothing


def test_compact_puts_kept_triplets_first_and_drops_the_gather():
    _, layer = make_layer(keep=SCATTERED, lambda_grad=True)
    x = torch.randn(6, IN)
    before, delta = layer(x), layer.delta_weight()
    perm = layer.compact()
    assert perm.tolist() == [0, 2, 3, 6, 8, 1, 4, 5, 7]
    assert layer.triplet_mask.tolist() == [True] * 5 + [False] * 4 and layer.active_idx is None
    assert layer.active_rank == 5 and layer.lambda_grad
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(layer.delta_weight(), delta)
    assert make_layer()[1].compact() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_name", ["none", "scattered"])
def test_merge_unmerge_round_trip(dtype, mask_name):
    linear, layer = make_layer(dtype=dtype, keep=MASKS[mask_name])
    original = linear.weight.detach().clone()
    peft_delta = (layer.lora_B.double() @ (layer.lora_A.double() * layer.lora_E.double())) * (
        8.0 / (R + 1e-5)
    )  # peft's get_delta_weight
    assert rel_err(layer.delta_weight(), peft_delta) < (1e-6 if dtype == torch.float32 else 1e-2)
    x = torch.randn(5, IN, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(linear.weight, original)
    assert rel_err(layer(x), unmerged.double()) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert rel_err(linear.weight.double() - original.double(), peft_delta) < (1e-5 if dtype == torch.float32 else 0.1)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_triplet_mask(None)
    layer.unmerge()
    if dtype == torch.float32:
        torch.testing.assert_close(linear.weight, original, rtol=0, atol=1e-6)
    else:
        assert torch.equal(linear.weight, original)
    torch.testing.assert_close(layer(x), unmerged)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_extra_repr_and_nn_linear_compatibility():
    _, layer = make_layer(keep=SCATTERED, lambda_grad=True)
    text = repr(layer)
    assert "r=9" in text and "active_rank=5" in text and "lambda_grad=True" in text
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(OUT, 2))
    assert model(torch.randn(3, IN)).shape == (3, 2)


# ---- orthogonality penalty ---------------------------------------------------------------------------------------


def _orth_model(dtype=torch.float32):
    torch.manual_seed(1)
    layers = [AdaLoRALinear(16, 24, 6, dtype=dtype), AdaLoRALinear(16, 24, 6, dtype=dtype),  # one shape, stacked
              AdaLoRALinear(24, 10, 6, dtype=dtype), AdaLoRALinear(10, 16, 4, dtype=dtype)]  # fmt: skip
    for layer in layers:
        with torch.no_grad():
            layer.lora_A.normal_(0, 0.3)
            layer.lora_B.normal_(0, 0.3)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("form", ["paper", "peft"])
def test_orth_reg_matches_a_direct_loop(form):
    model = _orth_model(torch.float64)
    terms = []
    for layer in model:
        P, Q = layer.lora_B, layer.lora_A
        for gram in (P.t() @ P, Q @ Q.t()):
            residual = gram - torch.eye(gram.shape[0], dtype=gram.dtype)
            terms.append((residual**2).sum() if form == "paper" else torch.norm(residual, p="fro"))
    expected = sum(terms) if form == "paper" else sum(terms) / len(terms)  # peft: the mean of unsquared norms
    value = orth_reg(model, form=form)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
    params = [p for layer in model for p in (layer.lora_A, layer.lora_B)]
    for g, g_ref in zip(torch.autograd.grad(value, params), torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_orth_reg_is_zero_for_orthonormal_factors_and_float32_for_half():
    layer = AdaLoRALinear(16, 24, 6, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(24, 6, dtype=torch.float64))[0])  # orthonormal columns
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(16, 6, dtype=torch.float64))[0].t())  # orthonormal rows
    assert orth_reg(nn.Sequential(layer)).item() < 1e-25
    wide = _orth_model(torch.float64)
    half = copy.deepcopy(wide).half()
    value = orth_reg(half)
    assert value.dtype == torch.float32
    assert rel_err(value, orth_reg(wide)) < 1e-3
    with pytest.raises(ValueError, match="form must be"):
        orth_reg(half, form="squared")
    with pytest.raises(ValueError, match="no AdaLoRALinear"):
        orth_reg(nn.Linear(3, 3))


# ---- rank allocator --------------------------------------------------------------------------------------------


class ToyModel(nn.Module):
    def __init__(self, ranks=(6, 6, 5), dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.first = AdaLoRALinear.from_linear(nn.Linear(12, 20, dtype=dtype), ranks[0])
        self.second = AdaLoRALinear.from_linear(nn.Linear(20, 16, dtype=dtype), ranks[1])
        self.head = AdaLoRALinear.from_linear(nn.Linear(16, 7, dtype=dtype), ranks[2])

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def test_config_validation_and_peft_style_config():
    with pytest.raises(ValueError, match="total_step"):
        AdaLoRAConfig()
    with pytest.raises(ValueError, match="no budgeting phase"):
        AdaLoRAConfig(total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match="beta1"):
        AdaLoRAConfig(total_step=10, beta1=1.0)
    model = ToyModel()
    with pytest.raises(ValueError, match="budget can only shrink"):
        RankAllocator(model, target_r=7, total_step=10)
    with pytest.raises(TypeError, match="not both"):
        RankAllocator(model, AdaLoRAConfig(total_step=10), target_r=2)
    with pytest.raises(ValueError, match="no AdaLoRALinear"):
        RankAllocator(nn.Linear(3, 3), total_step=10)
    # peft's AdaLoraConfig, or anything with its field names (extra fields are ignored)
    peft_like = types.SimpleNamespace(target_r=2, init_r=6, tinit=1, tfinal=2, deltaT=3, beta1=0.8, beta2=0.9,
                                      orth_reg_weight=0.1, total_step=40, target_modules=["first"])  # fmt: skip
    allocator = RankAllocator(model, peft_like)
    assert (allocator.init_bgt, allocator.target_bgt, allocator.orth_reg_weight) == (17, 6, 0.1)
    assert allocator.config.deltaT == 3 and allocator.beta2 == 0.9


def test_budget_schedule_is_peft_cubic():
    allocator = RankAllocator(ToyModel(), target_r=2, tinit=10, tfinal=20, deltaT=5, total_step=110)
    b0, bT = 17, 6
    assert allocator.budget_schedule(0) == (b0, False) and allocator.budget_schedule(10) == (b0, False)
    for step in (11, 12, 40, 89, 90):
        expected = int((b0 - bT) * (1 - (step - 10) / 80) ** 3 + bT)
        assert allocator.budget_schedule(step) == (expected, step % 5 == 0)
    assert allocator.budget_schedule(11)[0] == 16 and allocator.budget_schedule(40)[0] == 8
    assert allocator.budget_schedule(91) == (bT, True) and allocator.budget_schedule(109) == (bT, True)


class Algorithm1:
    """The AdaLoRA paper's Algorithm 1, written plainly (Eqs. 7-12), with peft's conventions for where the schedule's
    phases start (step <= tinit: no masking; masking every deltaT; a last forced mask at T - tfinal) and its integer
    budget. Sensitivities use the weights and gradients present when it is called, as the allocator does."""

    def __init__(self, layers, target_r, tinit, tfinal, deltaT, total_step, beta1=0.85, beta2=0.85):
        self.layers, self.tinit, self.tfinal, self.deltaT, self.T = layers, tinit, tfinal, deltaT, total_step
        self.beta1, self.beta2 = beta1, beta2
        self.b0 = sum(layer.r for layer in layers.values())
        self.bT = target_r * len(layers)
        self.Ibar, self.Ubar = {}, {}

    def budget(self, t):  # Eq. 12
        if t <= self.tinit:
            return self.b0
        if t >= self.T - self.tfinal:
            return self.bT
        return int(self.bT + (self.b0 - self.bT) * (1 - (t - self.tinit) / (self.T - self.tfinal - self.tinit)) ** 3)

    def step(self, t):
        """Returns (budget, {layer: kept bool [r]} if this step masks, else None, scores)."""
        if t < self.T - self.tfinal:
            for name, layer in self.layers.items():
                for pname in ("lora_A", "lora_B", "lora_E"):
                    w = getattr(layer, pname)
                    grad = torch.zeros_like(w) if w.grad is None else w.grad
                    sensitivity = (w * grad).abs().detach()  # Eq. 8
                    key = (name, pname)
                    old_ibar = self.Ibar.get(key, torch.zeros_like(w))
                    self.Ibar[key] = self.beta1 * old_ibar + (1 - self.beta1) * sensitivity  # Eq. 9
                    old_ubar = self.Ubar.get(key, torch.zeros_like(w))
                    self.Ubar[key] = self.beta2 * old_ubar + (1 - self.beta2) * (sensitivity - self.Ibar[key]).abs()
        masks = t == self.T - self.tfinal or (self.tinit < t < self.T - self.tfinal and t % self.deltaT == 0)
        if not masks:
            return self.budget(t), None, None
        scores = {}
        for name, layer in self.layers.items():
            s = {p: self.Ibar[(name, p)] * self.Ubar[(name, p)] for p in ("lora_A", "lora_B", "lora_E")}  # Eq. 11
            scores[name] = torch.stack(
                [s["lora_E"][i, 0] + s["lora_A"][i].mean() + s["lora_B"][:, i].mean() for i in range(layer.r)]
            )  # Eq. 7
        every = [(score.item(), name, i) for name, sc in scores.items() for i, score in enumerate(sc)]
        top = sorted(every, reverse=True)[: self.budget(t)]  # T(.): keep the top-b(t) triplets
        keep = {name: torch.zeros(layer.r, dtype=torch.bool) for name, layer in self.layers.items()}
        for _, name, i in top:
            keep[name][i] = True
        return self.budget(t), keep, scores


@pytest.mark.parametrize("masked_lambda_grad", [True, False], ids=["peft-grad", "prune"])
def test_allocator_follows_algorithm_1(masked_lambda_grad):
    T, tinit, tfinal, deltaT = 24, 3, 5, 2
    model = ToyModel()
    allocator = RankAllocator(model, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=T, beta1=0.8,
                              beta2=0.9, masked_lambda_grad=masked_lambda_grad)  # fmt: skip
    layers = {"first": model.first, "second": model.second, "head": model.head}
    reference = Algorithm1(layers, 2, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=T, beta1=0.8, beta2=0.9)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 12, generator=g, dtype=torch.float64), torch.randn(32, 7, generator=g, dtype=torch.float64)
    final_pattern, last, budgets = None, None, []
    for step in range(T):
        F.mse_loss(model(x), y).backward()
        for layer in layers.values():  # masked triplets: P, Q get nothing; lambda gets peft's gradient while allocating
            if layer.triplet_mask is not None and layer.active_rank > 0:
                m = ~layer.triplet_mask
                assert (
                    torch.count_nonzero(layer.lora_A.grad[m]) == 0 and torch.count_nonzero(layer.lora_B.grad[:, m]) == 0
                )
                n_lambda_grads = torch.count_nonzero(layer.lora_E.grad[m])
                assert n_lambda_grads == (int(m.sum()) if layer.lambda_grad else 0)
                assert layer.lambda_grad == (masked_lambda_grad and step <= T - tfinal)
        optimizer.step()
        budget_ref, keep_ref, scores_ref = reference.step(step)
        budget, pattern = allocator.update_and_allocate(model, step)
        budgets.append(budget)
        assert budget == budget_ref
        assert (pattern is not None) == (keep_ref is not None), step
        if keep_ref is not None:
            assert pattern == {name: keep_ref[name].tolist() for name in layers}, step  # the least important masked
            assert sum(sum(k) for k in pattern.values()) == budget
            for name, layer in layers.items():
                kept = keep_ref[name]
                assert torch.count_nonzero(layer.lora_E[~kept]) == 0  # lambda_i = 0 for masked triplets
                assert layer.active_rank == int(kept.sum())  # and the layer skips them
                if step < T - tfinal:
                    torch.testing.assert_close(
                        allocator.triplet_scores(model)[name], scores_ref[name], rtol=1e-12, atol=0
                    )
            if step == T - tfinal:
                final_pattern = pattern
        elif tinit < step < T - tfinal:  # between two allocations: peft computes every triplet; pruning keeps masks
            for name, layer in layers.items():
                kept = layer.r if masked_lambda_grad or last is None else sum(last[name])
                assert layer.active_rank == kept, (step, name)
        last = pattern if pattern is not None else last
        if step > T - tfinal:  # fixed pattern, re-applied after every step
            assert allocator.rank_pattern == final_pattern
            for name, layer in layers.items():
                assert layer.triplet_mask.tolist() == final_pattern[name] and not layer.lambda_grad
                assert torch.count_nonzero(layer.lora_E[~layer.triplet_mask]) == 0
        optimizer.zero_grad()
    assert budgets[: tinit + 1] == [17] * (tinit + 1) and budgets[-tfinal - 1 :] == [6] * (tfinal + 1)
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))  # the cubic schedule only shrinks


def test_adalora_training_meets_the_budget_and_learns():
    """Synthetic regression: a frozen random MLP whose first two layers need a low-rank update (rank 3 and rank 1);
    AdaLoRA at init_r=6 per layer must end at target_r=2 per layer on average (6 triplets) and fit the teacher."""
    torch.manual_seed(0)
    dims = [(24, 32), (32, 32), (32, 8)]
    student = nn.Sequential(nn.Linear(*dims[0]), nn.Tanh(), nn.Linear(*dims[1]), nn.Tanh(), nn.Linear(*dims[2]))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for index, rank in ((0, 3), (2, 1)):
            w = teacher[index].weight
            w += 0.6 * torch.randn(w.shape[0], rank) @ torch.randn(rank, w.shape[1]) / w.shape[1] ** 0.5
    for index in (0, 2, 4):
        student[index] = AdaLoRALinear.from_linear(student[index], 6, alpha=6.0)
    total = 300
    allocator = RankAllocator(student, target_r=2, tinit=40, tfinal=80, deltaT=5, total_step=total)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    x_eval = torch.randn(256, 24, generator=g)
    with torch.no_grad():
        y_eval = teacher(x_eval)
        initial = F.mse_loss(student(x_eval), y_eval).item()
    for step in range(total):
        x = torch.randn(64, 24, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(student(x), y) + 0.05 * orth_reg(student)
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(student, step)
        optimizer.zero_grad()
    layers = [student[i] for i in (0, 2, 4)]
    kept = [layer.active_rank for layer in layers]
    assert sum(kept) == allocator.target_bgt == 6
    for layer in layers:
        mask = layer.triplet_mask
        assert mask is None or torch.count_nonzero(layer.lora_E[~mask]) == 0
    with torch.no_grad():
        final = F.mse_loss(student(x_eval), y_eval).item()
    assert final < 0.15 * initial, (initial, final, kept)  # 0.055-0.079 over seeds 0-2
    assert kept[0] >= 2, kept  # the rank-3 update got at least 2 of the 6 triplets


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed (CI does not need it)")
@pytest.mark.parametrize("deltaT", [1, 3])
def test_training_run_equals_peft(deltaT):
    """The same AdaLoRA run in peft and here (float64, Adam, peft's orth_reg form): same masks, same weights."""
    try:
        from peft import AdaLoraConfig, get_peft_model
    except Exception as exc:  # installed but broken (peft imports transformers)
        pytest.skip(f"peft does not import: {type(exc).__name__}: {exc}")

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.head = nn.Linear(12, 20), nn.Linear(20, 16), nn.Linear(16, 7)

        def forward(self, x):
            return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))

    torch.manual_seed(0)
    base = Plain().double()
    ours = copy.deepcopy(base)
    names = ["first", "second", "head"]
    T, tinit, tfinal = 24, 3, 5
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=T, lora_alpha=8,
                           target_modules=names)  # fmt: skip
    peft_model = get_peft_model(base, config)
    for name in names:
        layer, theirs = (
            AdaLoRALinear.from_linear(getattr(ours, name), 6, alpha=8),
            getattr(peft_model.base_model.model, name),
        )
        with torch.no_grad():
            for ours_p, theirs_p in (
                (layer.lora_A, theirs.lora_A),
                (layer.lora_B, theirs.lora_B),
                (layer.lora_E, theirs.lora_E),
            ):
                ours_p.copy_(theirs_p["default"])
        setattr(ours, name, layer)
    allocator = RankAllocator(ours, config)
    peft_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "ranknum" not in n]
    opt_peft = torch.optim.Adam(peft_params, lr=1e-2)
    opt_ours = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 12, generator=g, dtype=torch.float64), torch.randn(32, 7, generator=g, dtype=torch.float64)

    def peft_orth_reg():  # what AdaLoraModel.forward adds when the model returns a loss
        terms = [torch.norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(6, dtype=p.dtype), p="fro")
                 for n, p in peft_model.named_parameters() if "lora_A" in n or "lora_B" in n]  # fmt: skip
        return sum(terms) / len(terms)

    for step in range(T):
        (F.mse_loss(peft_model(x), y) + 0.5 * peft_orth_reg()).backward()
        with use_backend("torch"):
            (F.mse_loss(ours(x), y) + 0.5 * orth_reg(ours, form="peft")).backward()
        opt_peft.step()
        opt_ours.step()
        peft_model.base_model.update_and_allocate(step)
        allocator.update_and_allocate(ours, step)
        opt_peft.zero_grad()
        opt_ours.zero_grad()
        for name in names:
            theirs, layer = getattr(peft_model.base_model.model, name), getattr(ours, name)
            for ours_p, theirs_p in (
                (layer.lora_A, theirs.lora_A),
                (layer.lora_B, theirs.lora_B),
                (layer.lora_E, theirs.lora_E),
            ):
                torch.testing.assert_close(ours_p, theirs_p["default"], rtol=1e-9, atol=1e-12)
        peft_pattern = peft_model.peft_config["default"].rank_pattern
        if peft_pattern is not None:
            assert {k.split(".")[-3]: v for k, v in peft_pattern.items()} == allocator.rank_pattern
