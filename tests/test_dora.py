"""DoRA: dora_linear's forward and all four gradients against the float64 oracle on every backend that runs here,
the detached norm, DoRALinear (peft's names, init, merge/unmerge, the norm cache), torch.compile, bad input.

On CPU the Triton kernels run under the interpreter (small shapes, float32/float16); on a GPU the same cases run on
the device, plus the GPU-marked realistic sizes in bf16 and the peak-memory checks at the bottom.
"""

import importlib.util
import math

import pytest
import torch
from helpers import BACKEND_CASES, DEVICE, HAS_CUDA, REL_TOL, kernel_backends, make_lora_inputs, rel_err
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_kernels import dropout_mask, lora_linear, use_backend
from lowrank_kernels.modules.dora import DoRALinear
from lowrank_kernels.ops.dora.naive import dora_linear_ref
from lowrank_kernels.ops.dora.op import dora_linear, dora_weight_norm, weight_norm_sq

SCALE = 0.75

# (M, K, N, R, b): decode sizes (M <= 64: one fused launch), prefill sizes (shrink + GEMM), odd everything.
SHAPES = [
    pytest.param(1, 70, 33, 8, 8, id="M1-K70-N33-r8-b8"),
    pytest.param(7, 70, 33, 8, 5, id="M7-K70-N33-r8-b5"),
    pytest.param(63, 37, 50, 16, 16, id="M63-K37-N50-r16-b16"),
    pytest.param(65, 40, 24, 4, 1, id="M65-K40-N24-r4-b1"),
    pytest.param(130, 70, 33, 24, 17, id="M130-K70-N33-r24-b17"),
    pytest.param(9, 33, 21, 160, 129, id="M9-K33-N21-r160-b129"),  # rank > 128: two rank chunks in the norm kernel
]


def make_dora_inputs(M, K, N, R, dtype, *, bias=True, lead=(), seed=0):
    """LoRA's balanced inputs plus a magnitude around the row norms (|W0_n| ~ 1), so g is O(1) and not 1."""
    x, weight, bias_t, A, B, _ = make_lora_inputs(M, K, N, R, dtype, bias=bias, lead=lead, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    magnitude = (0.5 + torch.rand(N, generator=g, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)
    return x, weight, bias_t, A, B, magnitude


def dora_oracle(x, weight, bias, A, B, magnitude, *, scale, rank, mask=None, grad_rank_start=0, grad_out=None):
    """float64 forward and autograd gradients (x, A, B, magnitude) of peft's formula; frozen ranks zeroed."""
    d = [t.detach().double().requires_grad_() for t in (x, A, B, magnitude)]
    y = dora_linear_ref(d[0], weight.double(), None if bias is None else bias.double(), d[1], d[2], d[3], scale, rank,
                        None if mask is None else mask.double())  # fmt: skip
    if grad_out is None:
        return y.detach(), None
    grads = list(torch.autograd.grad(y, d, grad_out.double()))
    if grad_rank_start:
        grads[1][:grad_rank_start] = 0
        grads[2][:, :grad_rank_start] = 0
    return y.detach(), grads


def run_and_check(backend, dtype, M, K, N, R, b, *, bias=True, dropout=0.0, frozen=False, lead=(), transform_x=None,
                  norm_input=None):  # fmt: skip
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(M, K, N, R, dtype, bias=bias, lead=lead)
    if transform_x is not None:
        x = transform_x(x)
    params = [t.requires_grad_() for t in (x, A, B, magnitude)]
    kwargs = {}
    with use_backend(backend):
        if norm_input == "weight_norm_sq":
            kwargs["weight_norm_sq"] = weight_norm_sq(weight)
        elif norm_input == "weight_norm":
            kwargs["weight_norm"] = dora_weight_norm(weight, A, B, scale=SCALE, rank=b)
        y = dora_linear(x, weight, bias_t, A, B, magnitude, scale=SCALE, rank=b, dropout=dropout, frozen=frozen,
                        seed=1234 if dropout else None, **kwargs)  # fmt: skip
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    mask = dropout_mask(1234, (x.reshape(-1, K).shape[0], K), dropout, x.device).reshape(x.shape) if dropout else None
    y_ref, grads_ref = dora_oracle(x, weight, bias_t, A, B, magnitude, scale=SCALE, rank=b, mask=mask,
                                   grad_rank_start=b - 1 if frozen else 0, grad_out=grad_out)  # fmt: skip
    tol = REL_TOL[dtype]
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    assert rel_err(y, y_ref) < tol
    for name, g, g_ref in zip(["x", "lora_A", "lora_B", "magnitude"], grads, grads_ref, strict=True):
        assert g.dtype == dtype, name
        assert rel_err(g, g_ref) < tol, name
    # Ranks past b (and, frozen, before b - 1) get exactly zero gradient, not merely a small one.
    dA, dB = grads[1], grads[2]
    lo = b - 1 if frozen else 0
    assert torch.count_nonzero(dA[b:]) == 0 and torch.count_nonzero(dB[:, b:]) == 0
    assert torch.count_nonzero(dA[:lo]) == 0 and torch.count_nonzero(dB[:, :lo]) == 0
    assert torch.count_nonzero(dA[lo:b]) > 0 and torch.count_nonzero(dB[:, lo:b]) > 0


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, K, N, R, b", SHAPES)
def test_forward_backward(backend, dtype, gemm, M, K, N, R, b, poison_empty):
    run_and_check(backend, dtype, M, K, N, R, b)


VARIANTS = [
    pytest.param(dict(bias=False), id="nobias"),
    pytest.param(dict(dropout=0.3), id="dropout"),
    pytest.param(dict(dropout=0.2, bias=False, frozen=True), id="dropout-nobias-frozen"),
    pytest.param(dict(frozen=True), id="frozen"),
    pytest.param(dict(lead=(3,)), id="3d"),
    pytest.param(dict(lead=(2,), dropout=0.25), id="3d-dropout"),
    pytest.param(dict(transform_x=lambda x: x.t().contiguous().t()), id="x-column-major"),
    pytest.param(dict(norm_input="weight_norm_sq"), id="cached-weight_norm_sq"),
    pytest.param(dict(norm_input="weight_norm"), id="cached-weight_norm"),
]


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, b", [pytest.param(5, 3, id="decode-M5"), pytest.param(70, 6, id="prefill-M70")])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(backend, dtype, gemm, M, b, variant, poison_empty):
    run_and_check(backend, dtype, M, 37, 29, 8, b, **variant)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("with_cache", [False, True], ids=["computed-w0sq", "cached-w0sq"])
@pytest.mark.parametrize("R, b", [(8, 5), (160, 150)])
def test_factored_norm_matches_the_direct_norm(backend, with_cache, R, b):
    """||W0 + s B A||_row without forming W0 + s B A, against the direct float64 norm (B not small: all terms count)."""
    dtype = torch.float32
    _, weight, _, A, B, _ = make_lora_inputs(1, 70, 45, R, dtype)
    direct = torch.linalg.vector_norm(weight.double() + 2.5 * (B[:, :b].double() @ A[:b].double()), dim=1)
    cache = weight_norm_sq(weight) if with_cache else None
    with use_backend(backend):
        norm = dora_weight_norm(weight, A, B, scale=2.5, rank=b, weight_norm_sq=cache)
    assert norm.dtype == torch.float32 and norm.shape == (45,)
    assert rel_err(norm, direct) < 1e-6
    assert (direct / torch.linalg.vector_norm(weight.double(), dim=1) - 1).abs().max() > 0.1  # the adapter matters


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_norm_is_detached(backend, dropout):
    """A and B get exactly LoRA's gradients of the upstream gradient g * dy (the norm is a constant, DoRA §4.3);
    without dropout x does too. An oracle whose norm is not detached differs by far more than the tolerance."""
    dtype = torch.float32
    M, K, N, R, b = 9, 37, 29, 8, 6
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(M, K, N, R, dtype)
    params = [t.requires_grad_() for t in (x, A, B)]
    grad_out = torch.randn(M, N, device=DEVICE, dtype=dtype)
    with use_backend(backend):
        y = dora_linear(x, weight, bias_t, A, B, magnitude, scale=SCALE, rank=b, dropout=dropout, seed=7)
        dx, dA, dB = torch.autograd.grad(y, params, grad_out)
        g = magnitude / dora_weight_norm(weight, A, B, scale=SCALE, rank=b)
        y_lora = lora_linear(x, weight, bias_t, A, B, scale=SCALE, rank=b, dropout=dropout, seed=7)
        dx_lora, dA_lora, dB_lora = torch.autograd.grad(y_lora, params, grad_out * g)
    tol = REL_TOL[dtype]
    assert rel_err(dA, dA_lora.double()) < tol and rel_err(dB, dB_lora.double()) < tol
    if dropout > 0.0:
        return
    assert rel_err(dx, dx_lora.double()) < tol
    # The same comparison would catch a norm that is not detached.
    x64, W = x.detach().double(), weight.double()
    A64, B64 = (t.detach().double().requires_grad_() for t in (A, B))
    norm = torch.linalg.vector_norm(W + SCALE * B64[:, :b] @ A64[:b], dim=1)  # not detached
    z = x64 @ W.t() + SCALE * (x64 @ A64[:b].t()) @ B64[:, :b].t()
    dA_attached, _ = torch.autograd.grad((magnitude.double() / norm) * z, (A64, B64), grad_out.double())
    assert rel_err(dA, dA_attached) > 10 * tol


@pytest.mark.parametrize("backend", kernel_backends())
def test_tolerance_catches_a_wrong_rank_or_scale(backend):
    """The comparison used above is tight enough that rank b - 1, a dropped bias or g = 1 cannot pass."""
    dtype = torch.float16 if backend == "triton" else torch.float32
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(7, 70, 33, 8, dtype)
    with use_backend(backend):
        y = dora_linear(x, weight, bias_t, A, B, magnitude, scale=SCALE, rank=5)
    unit_g = dora_weight_norm(weight, A, B, scale=SCALE, rank=5).to(dtype)  # m = ||.||: g = 1, plain LoRA
    wrong = [
        dora_oracle(x, weight, bias_t, A, B, magnitude, scale=SCALE, rank=4)[0],
        dora_oracle(x, weight, None, A, B, magnitude, scale=SCALE, rank=5)[0],
        dora_oracle(x, weight, bias_t, A, B, unit_g, scale=SCALE, rank=5)[0],
    ]
    for y_wrong in wrong:
        assert rel_err(y, y_wrong) > 10 * REL_TOL[dtype]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_zero_magnitude_column(backend, dropout):
    """A magnitude entry of exactly 0 zeroes its column (peft: pruned rows) and still gets the true gradient
    ``sum(dy * z) / ||W'||``: z is saved, not recovered from the output (which would give 0 there)."""
    dtype = torch.float32
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(6, 24, 16, 4, dtype)
    magnitude[3] = 0.0
    magnitude[7] = 1e-3 * magnitude[7]  # tiny beside the bias: (y - bias) / g would lose its digits
    m = magnitude.requires_grad_()
    with use_backend(backend):
        y = dora_linear(x, weight, bias_t, A, B, m, scale=SCALE, dropout=dropout, seed=5)
        grad_out = torch.randn_like(y)
        (dm,) = torch.autograd.grad(y, m, grad_out)
    mask = dropout_mask(5, tuple(x.shape), dropout, x.device) if dropout else None
    _, (_, _, _, dm_ref) = dora_oracle(x, weight, bias_t, A, B, m, scale=SCALE, rank=4, mask=mask, grad_out=grad_out)
    if not dropout:
        assert torch.equal(y[:, 3], bias_t[3].expand(6))
    assert dm_ref[3].abs() > 0.01 and (dm[3] - dm_ref[3]).abs() < 1e-5 * dm_ref.abs().max()
    assert rel_err(dm, dm_ref) < REL_TOL[dtype]


@pytest.mark.parametrize("backend", kernel_backends())
def test_trainable_base_weight_and_bias_get_their_gradients(backend):
    """W0 and bias are frozen in DoRALinear; a caller who trains them gets the plain gradients (norm detached)."""
    dtype = torch.float32
    for dropout in (0.0, 0.3):
        x, weight, bias_t, A, B, magnitude = make_dora_inputs(9, 24, 16, 4, dtype)
        for t in (weight, bias_t):
            t.requires_grad_()
        with use_backend(backend):
            y = dora_linear(x, weight, bias_t, A, B, magnitude, scale=SCALE, dropout=dropout, seed=3)
        grad_out = torch.randn_like(y)
        dW, db = torch.autograd.grad(y, (weight, bias_t), grad_out)
        w = weight.detach().double().requires_grad_()
        mask = dropout_mask(3, (9, 24), dropout, x.device).double() if dropout else None
        y_ref = dora_linear_ref(x.double(), w, bias_t.detach().double(), A.double(), B.double(), magnitude.double(),
                                SCALE, dropout_mask=mask)  # fmt: skip
        (dW_ref,) = torch.autograd.grad(y_ref, w, grad_out.double())
        assert rel_err(dW, dW_ref) < REL_TOL[dtype]
        assert rel_err(db, grad_out.double().sum(0)) < REL_TOL[dtype]


@pytest.mark.parametrize("backend", kernel_backends())
def test_empty_batch(backend):
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(0, 24, 16, 4, torch.float32)
    x.requires_grad_()
    with use_backend(backend):
        y = dora_linear(x, weight, bias_t, A, B, magnitude, scale=SCALE)
        y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 24)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any ATen op creates in new storage (views, detach excluded): an [N, K] temporary."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        existing = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                if t.numel() > self.largest:
                    self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_no_weight_sized_temporary(backend, dropout, monkeypatch):
    """Norm, forward and backward allocate nothing [N, K]-sized (W0 + s B A, B A, a scaled W0): every ATen op the
    backends run is watched (the watch sits inside the custom ops, where the allocations happen)."""
    import lowrank_kernels.ops.dora.op as op

    mode = _LargestAllocation()

    class Watched:  # every primitive of the chosen backend runs under the allocation watch
        def __init__(self, impl):
            self.impl = impl

        def __getattr__(self, name):
            fn = getattr(self.impl, name)

            def run(*args, **kwargs):
                with mode:
                    return fn(*args, **kwargs)

            return run

    implementation = op.implementation
    monkeypatch.setattr(op, "implementation", lambda name: Watched(implementation(name)))
    M, K, N, R = 6, 96, 80, 4  # N * K = 7680 > M * max(N, K) = 576
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(M, K, N, R, torch.float32)
    cache = weight_norm_sq(weight)  # the torch backend needs it (it would square W0 whole); Triton does not
    params = [t.requires_grad_() for t in (x, A, B, magnitude)]
    with use_backend(backend):
        y = dora_linear(x, weight, bias_t, A, B, magnitude, scale=SCALE, dropout=dropout,
                        weight_norm_sq=cache if backend == "torch" else None)  # fmt: skip
        torch.autograd.grad(y, params, torch.randn_like(y))
    assert 0 < mode.largest < N * K, f"{mode.op} allocated {mode.largest} elements"


# ---- DoRALinear ------------------------------------------------------------------------------------------------


def make_layer(in_f=40, out_f=24, r=8, alpha=16.0, bias=True, dtype=torch.float32, trained=True, **kwargs):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = DoRALinear.from_linear(linear, r, alpha=alpha, **kwargs)
    if trained:  # give B and m values so the adapter and the magnitude both matter
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.5)
            layer.lora_magnitude_vector.mul_(torch.rand(out_f, dtype=dtype) + 0.5)
    return linear, layer


def test_from_linear_names_shapes_and_init():
    linear, layer = make_layer(r=4, trained=False)
    assert isinstance(layer, DoRALinear) and layer.weight is linear.weight and not layer.weight.requires_grad
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (24, 40), "bias": (24,), "lora_A.weight": (4, 40), "lora_B.weight": (24, 4),
                      "lora_magnitude_vector": (24,)}  # fmt: skip
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert dict(layer.named_buffers()).keys() == {"weight_norm_sq"}
    # peft's init: m = ||W0 + s B A||_row = ||W0||_row with B = 0, so the layer starts as the wrapped linear.
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.vector_norm(linear.weight, dim=1))
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), linear(x))


def test_state_dict_maps_from_peft_names():
    """A peft adapter file's keys (adapter name stripped) load as they are; a live peft layer's drop '.default'."""
    _, layer = make_layer(r=4)
    _, other = make_layer(r=4, trained=False)
    peft_names = {"weight": "base_layer.weight", "bias": "base_layer.bias", "lora_A.weight": "lora_A.default.weight",
                  "lora_B.weight": "lora_B.default.weight",
                  "lora_magnitude_vector": "lora_magnitude_vector.default.weight"}  # fmt: skip
    peft_live = {peft_names[k]: v for k, v in layer.state_dict().items()}  # a live peft layer's state_dict()

    def from_peft(key: str) -> str:
        key = key.replace(".default", "").removeprefix("base_layer.")
        return "lora_magnitude_vector" if key == "lora_magnitude_vector.weight" else key

    other.load_state_dict({from_peft(k): v for k, v in peft_live.items()})
    x = torch.randn(4, 40)
    torch.testing.assert_close(other(x), layer(x))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("b, frozen", [(8, False), (3, True)])
def test_module_forward_and_grads_match_the_oracle(backend, b, frozen):
    _, layer = make_layer()
    layer.to(DEVICE)  # the kernel backends run on the GPU where there is one
    layer.set_rank(b, frozen=frozen)
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    with use_backend(backend):
        y = layer(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    y_ref, (dx, dA, dB, dm) = dora_oracle(x, layer.weight, layer.bias, A, B, m, scale=16.0 / b, rank=b,
                                          grad_rank_start=b - 1 if frozen else 0, grad_out=grad_out)  # fmt: skip
    tol = REL_TOL[torch.float32]
    assert rel_err(y, y_ref) < tol and rel_err(x.grad, dx) < tol
    assert rel_err(A.grad, dA) < tol and rel_err(B.grad, dB) < tol and rel_err(m.grad, dm) < tol
    assert layer.weight.grad is None


def test_dropout_only_in_training_mode():
    linear, layer = make_layer(dropout=0.5)
    x = torch.randn(4, 40)
    layer.eval()
    eval_out = layer(x)
    assert torch.equal(eval_out, layer(x))
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), eval_out)


class _CountingNorm:
    def __init__(self, monkeypatch):
        import lowrank_kernels.modules.dora as module

        self.calls, self._norm = 0, module.dora_weight_norm
        monkeypatch.setattr(module, "dora_weight_norm", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._norm(*args, **kwargs)


def test_norm_cache_reused_and_invalidated(monkeypatch):
    """Inference (eval, no grad) computes the norm once while W0, A, B, rank and dtype are unchanged; an optimiser
    step, set_rank, train()/eval(), load_state_dict recompute it; training never caches; results always match."""
    _, layer = make_layer()
    counter = _CountingNorm(monkeypatch)
    x = torch.randn(5, 40)

    def check(expected_calls):
        A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
        y_ref, _ = dora_oracle(x, layer.weight, layer.bias, A, B, m, scale=layer.scaling, rank=layer.active_rank)
        with torch.no_grad():
            assert rel_err(layer(x), y_ref) < REL_TOL[torch.float32]
        assert counter.calls == expected_calls

    layer.eval()
    check(1)
    check(1)
    with torch.no_grad():  # a magnitude-only change needs no new norm
        layer.lora_magnitude_vector.mul_(1.5)
    check(1)
    layer(x).sum().backward()  # autograd on: not cached (nor cached against)
    assert counter.calls == 2
    check(2)
    with torch.no_grad():
        layer.lora_A.weight.add_(0.1)  # an in-place update moves the version counter
    check(3)
    layer.set_rank(5)
    check(4)
    layer.load_state_dict({k: v.clone() + 0.01 for k, v in layer.state_dict().items()})
    check(5)
    layer.train()  # training recomputes every call: two micro-batches, two norms
    layer(x).square().sum().backward()
    layer(x).square().sum().backward()
    assert counter.calls == 7
    # A fused optimiser moves no version counter (torch 2.13): eval() after training is what drops the cache.
    torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True).step()
    layer.eval()
    check(8)


def test_norm_cached_in_inference_mode_is_not_reused_for_training():
    _, layer = make_layer()
    x = torch.randn(3, 40)
    with torch.inference_mode():
        y_inference = layer(x)
    y = layer(x)  # would fail saving an inference tensor for backward if the cached norm were reused
    y.sum().backward()
    torch.testing.assert_close(y.detach(), y_inference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_round_trip(dtype):
    linear, layer = make_layer(dtype=dtype)
    layer.set_rank(5)
    original = linear.weight.detach().clone()
    x = torch.randn(5, 40, dtype=dtype)
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(linear.weight, original)
    assert rel_err(layer(x), unmerged_out.double()) < (1e-5 if dtype == torch.float32 else 2e-2)
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


def test_merge_refuses_non_finite():
    linear, layer = make_layer()
    original = linear.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector[2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge()
    assert not layer.merged and torch.equal(linear.weight, original)


def test_float32_adapter_on_a_half_base():
    """peft keeps adapters (and the magnitude) in float32 on a low-precision base; the layer casts them per call."""
    _, layer = make_layer(dtype=torch.bfloat16)
    layer.float()
    layer.weight.data = layer.weight.data.bfloat16()
    layer.bias.data = layer.bias.data.bfloat16()
    y = layer(torch.randn(3, 40, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32


# ---- torch.compile ---------------------------------------------------------------------------------------------


def test_opcheck():
    """torch.library's consistency checks (schema, fake tensor, autograd registration) on the norm and forward ops."""
    x = torch.randn(5, 12, requires_grad=True)
    weight, bias = torch.randn(7, 12), torch.randn(7)
    A, B = torch.randn(4, 12, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    m = (torch.rand(7) + 0.5).requires_grad_()
    norm = torch.ops.lowrank_kernels.dora_norm(weight, A.detach(), B.detach(), None, 0.5, 3)
    torch.library.opcheck(torch.ops.lowrank_kernels.dora_norm.default, (weight, A.detach(), B.detach(), None, 0.5, 3))
    for p, seed in ((0.0, None), (0.25, torch.tensor(3))):
        args = (x, weight, bias, A, B, m, norm, 0.5, 3, 0, p, seed, True)
        torch.library.opcheck(torch.ops.lowrank_kernels.dora_fwd.default, args)


def make_model(dropout: float):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(DEVICE)
    model[0] = DoRALinear.from_linear(model[0], 8, alpha=16.0, dropout=dropout)
    model[2] = DoRALinear.from_linear(model[2], 4, alpha=8.0, dropout=dropout)
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B.weight, std=0.3)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_compile_fullgraph_forward_backward(dropout):
    model = make_model(dropout)
    x = torch.randn(6, 32, device=DEVICE)
    model[0].set_rank(5)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.manual_seed(1)
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(compiled_grads) == 6  # A, B, m of two layers
    if dropout == 0.0:
        torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
        for g_c, g_e in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)
    else:  # inductor draws its own random seeds; check the shapes and that every parameter trained
        assert out.shape == eager_out.shape
        assert all(torch.count_nonzero(g) > 0 for g in compiled_grads)


def test_compile_eval_mode():
    model = make_model(0.1).eval()
    x = torch.randn(3, 32, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


# ---- bad input -------------------------------------------------------------------------------------------------


def _call(**overrides):
    x, weight, bias, A, B, m = make_dora_inputs(5, 24, 16, 4, torch.float32)
    args = dict(x=x, weight=weight, bias=bias, lora_A=A, lora_B=B, magnitude=m)
    kwargs = dict(scale=1.0, rank=None, dropout=0.0)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return dora_linear(*args.values(), **kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        pytest.param(dict(x=torch.randn(5, 23)), ValueError, "x's last dimension", id="x-width"),
        pytest.param(dict(lora_A=torch.randn(4, 25)), ValueError, "lora_A must be", id="A-width"),
        pytest.param(dict(magnitude=torch.randn(15)), ValueError, "magnitude must be", id="m-len"),
        pytest.param(dict(magnitude=torch.randn(16, 1)), ValueError, "magnitude must be 1-D", id="m-2d"),
        pytest.param(dict(magnitude=torch.randn(16).double()), TypeError, "magnitude has dtype", id="m-dtype"),
        pytest.param(dict(magnitude=torch.randn(16, device="meta")), ValueError, "magnitude is on meta", id="m-dev"),
        pytest.param(dict(magnitude=[1.0] * 16), TypeError, "magnitude must be a torch.Tensor", id="m-list"),
        pytest.param(dict(weight_norm=torch.rand(3)), ValueError, "weight_norm must be", id="norm-len"),
        pytest.param(dict(weight_norm_sq=torch.rand(16, 2)), ValueError, "weight_norm_sq must be", id="w0sq-2d"),
        pytest.param(dict(rank=5), ValueError, "rank must be in", id="rank-too-big"),
        pytest.param(dict(dropout=1.0), ValueError, "dropout must be in", id="dropout-1"),
        pytest.param(dict(scale=math.inf), ValueError, "scale must be a finite", id="scale-inf"),
        pytest.param(dict(dropout=0.1, seed=2**31), ValueError, "seed must be", id="seed-big"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_bad_weight_norm_arguments():
    _, weight, _, A, B, _ = make_dora_inputs(1, 24, 16, 4, torch.float32)
    with pytest.raises(TypeError, match="lora_B has dtype torch.float64 but weight has torch.float32"):
        dora_weight_norm(weight, A, B.double(), scale=1.0)
    with pytest.raises(ValueError, match="rank must be in"):
        dora_weight_norm(weight, A, B, scale=1.0, rank=0)
    with pytest.raises(ValueError, match="r must be"):
        DoRALinear.from_linear(nn.Linear(4, 4), 0)


# ---- peft: the same numbers as its DoRA layer (where peft is installed) ---------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_matches_peft_dora_layer(dropout):
    try:
        import peft
    except Exception as exc:  # installed but broken (peft imports transformers)
        pytest.skip(f"peft does not import: {type(exc).__name__}: {exc}")
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(40, 24, dtype=torch.float64)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, use_dora=True, target_modules=["proj"])
    peft_layer = peft.inject_adapter_in_model(config, holder).proj.to(torch.float64)
    ours = DoRALinear.from_linear(nn.Linear(40, 24, dtype=torch.float64), 8, alpha=16.0, dropout=dropout)
    with torch.no_grad():
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.lora_A.weight.normal_(0, 0.2)
        ours.lora_B.weight.normal_(0, 0.2)
        ours.lora_magnitude_vector.copy_(torch.rand(24, dtype=torch.float64) + 0.5)
    x = torch.randn(6, 40, dtype=torch.float64)
    peft_layer(x)  # peft initialises the magnitude lazily, on the first forward
    state = {k.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
             .replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
             for k, v in ours.state_dict().items() if k.startswith("lora_")}  # fmt: skip
    peft_layer.load_state_dict(state, strict=False)
    if dropout:  # peft's dropout module applies our mask, so both layers drop the same entries
        mask = dropout_mask(11, (6, 40), dropout)
        peft_layer.lora_dropout["default"] = _FixedMask(mask)
        y = dora_linear(x, ours.weight, ours.bias, ours.lora_A.weight, ours.lora_B.weight, ours.lora_magnitude_vector,
                        scale=ours.scaling, dropout=dropout, seed=11)  # fmt: skip
        peft_layer.train()
    else:
        y = ours(x)
    y_peft = peft_layer(x)
    assert rel_err(y, y_peft.detach()) < 1e-12
    grads = torch.autograd.grad(y.sum(), [ours.lora_A.weight, ours.lora_B.weight, ours.lora_magnitude_vector])
    adapter = [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
               peft_layer.lora_magnitude_vector["default"].weight]  # fmt: skip
    for g, g_peft in zip(grads, torch.autograd.grad(y_peft.sum(), adapter), strict=True):
        assert rel_err(g, g_peft) < 1e-12


class _FixedMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


# ---- GPU: realistic sizes in bf16, and the memory promise (run by scripts/gpu_run.sh on the lent device) --------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "M, K, N, R, b",
    [
        pytest.param(1, 4096, 4096, 16, 16, id="M1-4096x4096-r16"),
        pytest.param(16, 4096, 11008, 64, 8, id="M16-4096x11008-r64-b8"),
        pytest.param(2048, 4096, 4096, 16, 16, id="M2048-4096x4096-r16"),
        pytest.param(2049, 11008, 4096, 64, 64, id="M2049-11008x4096-r64"),
    ],
)
@pytest.mark.parametrize("variant", [{}, dict(dropout=0.1)], ids=["plain", "dropout"])
def test_gpu_realistic(dtype, M, K, N, R, b, variant, poison_empty):
    run_and_check("triton", dtype, M, K, N, R, b, **variant)


def _peak_extra_bytes(fn) -> int:
    fn()  # compile and allocate workspaces first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_gpu_peak_memory_vs_lora(dropout):
    """fwd+bwd peak: DoRA <= LoRA + O((N + K) r) (+ the one saved [M, N] z with dropout); no [N, K] temporary."""
    M, K, N, R = 2048, 4096, 4096, 16
    x, weight, bias_t, A, B, magnitude = make_dora_inputs(M, K, N, R, torch.bfloat16)
    params = [t.requires_grad_() for t in (x, A, B)]
    m = magnitude.requires_grad_()
    cache = weight_norm_sq(weight)

    def lora():
        y = lora_linear(x, weight, bias_t, A, B, scale=SCALE, dropout=dropout, seed=1)
        return y, torch.autograd.grad(y, params, torch.ones_like(y))

    def dora():
        y = dora_linear(x, weight, bias_t, A, B, m, scale=SCALE, dropout=dropout, seed=1, weight_norm_sq=cache)
        return y, torch.autograd.grad(y, [*params, m], torch.ones_like(y))

    with use_backend("triton"):
        lora_peak, dora_peak = _peak_extra_bytes(lora), _peak_extra_bytes(dora)
    allowed = lora_peak + 8 * (N + K) * R * 4 + 2**20 + (M * N * 2 if dropout else 0)
    assert dora_peak <= allowed, f"DoRA peak {dora_peak / 2**20:.1f} MiB vs LoRA {lora_peak / 2**20:.1f} MiB"
