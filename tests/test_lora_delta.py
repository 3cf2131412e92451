"""lora_delta (the adapter term over a base product that is not ours, QLoRA's) against a plain float64 formula.

Forward and every gradient (x, lora_A, lora_B, rank_scale, y_base) on every backend that runs here: on CPU the
Triton kernels run under the interpreter (float32 / float16), both of its GEMM strategies above M = 64. Then the
QLoRA layers (LoRALinear4bit, DoRALinear4bit) on bitsandbytes' CPU backend, with dropout and DyLoRA's frozen mode.
"""

import math

import pytest
import torch
from helpers import BACKEND_CASES, REL_TOL, kernel_backends, rel_err

from lowrank_kernels import dropout_mask, lora_linear, use_backend
from lowrank_kernels.ops.lora import delta
from lowrank_kernels.ops.lora.delta import lora_delta

SCALE = 0.75
SEED = 1234

# (M, K, N, R, b): decode and prefill sizes, odd everything, rank < R, rank > 128.
SHAPES = [
    pytest.param(1, 70, 33, 8, 8, id="M1-K70-N33-r8-b8"),
    pytest.param(7, 37, 50, 16, 5, id="M7-K37-N50-r16-b5"),
    pytest.param(65, 40, 24, 4, 1, id="M65-K40-N24-r4-b1"),
    pytest.param(130, 70, 33, 24, 17, id="M130-K70-N33-r24-b17"),
    pytest.param(9, 33, 21, 130, 129, id="M9-K33-N21-r130-b129"),
]


def make_inputs(M, K, N, R, dtype, *, lead=(), rank_scale=False, seed=0):
    """y_base, x, A, B, v of balanced magnitude: the base and the adapter term both O(1), neither ever zero."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    return (rnd(*lead, M, N), rnd(*lead, M, K), rnd(R, K, std=max(K, 1) ** -0.5), rnd(N, R, std=R**-0.5),
            rnd(R) if rank_scale else None)  # fmt: skip


def reference(y_base, x, A, B, v, *, scale, rank, mask=None, grad_rank_start=0, grad_out=None):
    """The plain float64 formula ``y_base + s ((x * mask) A[:b]^T * v[:b]) B[:, :b]^T`` and its autograd gradients
    (y_base, x, A, B[, v]), the frozen ranks' zeroed."""
    d = [None if t is None else t.detach().double().requires_grad_() for t in (y_base, x, A, B, v)]
    xd = d[1] if mask is None else d[1] * mask.double()
    xa = xd @ d[2][:rank].t()
    if v is not None:
        xa = xa * d[4][:rank]
    y = d[0] + scale * (xa @ d[3][:, :rank].t())
    inputs = [t for t in d if t is not None]
    grads = list(torch.autograd.grad(y, inputs, grad_out.double()))
    lo = grad_rank_start
    grads[2][:lo], grads[3][:, :lo] = 0, 0
    if v is not None:
        grads[4][:lo] = 0
    return y.detach(), grads


def mask_for(x, dropout):
    if not dropout:
        return None
    K = x.shape[-1]
    return dropout_mask(SEED, (math.prod(x.shape[:-1]), K), dropout).reshape(x.shape)


def run_and_check(backend, dtype, M, K, N, R, b, *, rank_scale=False, dropout=0.0, frozen=False, lead=(),
                  views=None):  # fmt: skip
    y_base, x, A, B, v = make_inputs(M, K, N, R, dtype, lead=lead, rank_scale=rank_scale)
    if views is not None:
        y_base, x, A, B, v = views(y_base, x, A, B, v)
    params = [t.requires_grad_() for t in (y_base, x, A, B, v) if t is not None]
    with use_backend(backend):
        y = lora_delta(y_base, x, A, B, scale=SCALE, rank=b, rank_scale=v, dropout=dropout, frozen=frozen,
                       seed=SEED if dropout else None)  # fmt: skip
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    lo = b - 1 if frozen else 0
    y_ref, grads_ref = reference(y_base, x, A, B, v, scale=SCALE, rank=b, mask=mask_for(x, dropout),
                                 grad_rank_start=lo, grad_out=grad_out)  # fmt: skip
    tol = REL_TOL[dtype]
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], N)
    assert rel_err(y, y_ref) < tol
    # The adapter term alone: y_base is O(1) beside it, so a small error in the term must not hide behind it.
    assert rel_err(y.double() - y_base.double(), y_ref - y_base.double()) < 3 * tol
    assert grads[0] is grad_out or torch.equal(grads[0], grad_out)  # y_base's gradient: dy, unchanged
    for name, g, g_ref in zip(["y_base", "x", "lora_A", "lora_B", "rank_scale"], grads, grads_ref, strict=False):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) < tol, name
    # Ranks past b (and, frozen, before b - 1) get exactly zero gradient; the trained ones do not.
    dA, dB = grads[2], grads[3]
    assert torch.count_nonzero(dA[b:]) == 0 and torch.count_nonzero(dB[:, b:]) == 0
    assert torch.count_nonzero(dA[:lo]) == 0 and torch.count_nonzero(dB[:, :lo]) == 0
    assert torch.count_nonzero(dA[lo:b]) > 0 and torch.count_nonzero(dB[:, lo:b]) > 0
    if v is not None:
        dv = grads[4]
        assert torch.count_nonzero(dv[b:]) == 0 and torch.count_nonzero(dv[:lo]) == 0
    return y


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, K, N, R, b", SHAPES)
def test_forward_backward(backend, dtype, gemm, M, K, N, R, b, poison_empty):
    run_and_check(backend, dtype, M, K, N, R, b)


VARIANTS = [
    pytest.param(dict(rank_scale=True), id="rank_scale"),
    pytest.param(dict(dropout=0.3), id="dropout"),
    pytest.param(dict(frozen=True), id="frozen"),
    pytest.param(dict(frozen=True, rank_scale=True, dropout=0.2), id="frozen-rank_scale-dropout"),
    pytest.param(dict(lead=(2, 3)), id="3d-x"),
    pytest.param(dict(lead=(3,), dropout=0.25, rank_scale=True), id="3d-x-dropout-rank_scale"),
]


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, K, N, R, b", [SHAPES[1], SHAPES[3]])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(backend, dtype, gemm, M, K, N, R, b, variant, poison_empty):
    if variant.get("lead") and M > 64:
        M = M // 2 + 1  # 3-D x: rows = prod(lead) * M, still past 64
    run_and_check(backend, dtype, M, K, N, R, b, **variant)


def strided_views(y_base, x, A, B, v):
    """Every tensor argument as a non-contiguous view of the same values: transposes, column steps, a vector step."""
    y_wide = torch.zeros(*y_base.shape[:-1], 2 * y_base.shape[-1], dtype=y_base.dtype)
    y_wide[..., ::2] = y_base
    B_wide = torch.zeros(B.shape[0], 3 * B.shape[1], dtype=B.dtype)
    B_wide[:, 1::3] = B
    v_wide = None
    if v is not None:
        v_wide = torch.zeros(2 * v.shape[0], dtype=v.dtype)
        v_wide[::2] = v
    views = (y_wide[..., ::2], x.t().contiguous().t(), A.t().contiguous().t(), B_wide[:, 1::3],
             None if v is None else v_wide[::2])  # fmt: skip
    assert all(t is None or not t.is_contiguous() for t in views)
    return tuple(t if t is None else t.detach() for t in views)


@pytest.mark.parametrize("backend, dtype, gemm", BACKEND_CASES, indirect=["gemm"])
@pytest.mark.parametrize("M, K, N, R, b", [SHAPES[1], SHAPES[3]])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["plain", "dropout"])
def test_strided_views(backend, dtype, gemm, M, K, N, R, b, dropout, poison_empty):
    run_and_check(backend, dtype, M, K, N, R, b, rank_scale=True, dropout=dropout, views=strided_views)


@pytest.mark.parametrize("backend", kernel_backends())
def test_matches_lora_linear_and_its_dropout_mask(backend):
    """With y_base = x W0^T + bias, lora_delta is lora_linear: the same seeded mask (explicit seed, and the default
    seed drawn from torch's generator), the same gradients of x, A, B."""
    dtype = torch.float32
    y_base, x, A, B, v = make_inputs(70, 37, 21, 8, dtype, rank_scale=True)
    weight, bias = torch.randn(21, 37, dtype=dtype) * 37**-0.5, torch.randn(21, dtype=dtype)
    for seed in (SEED, None):
        outs = []
        for fn in ("delta", "linear"):
            xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, A, B))
            torch.manual_seed(7)
            with use_backend(backend):
                if fn == "delta":
                    y = lora_delta(torch.nn.functional.linear(xs, weight, bias), xs, As, Bs, scale=SCALE, rank=5,
                                   rank_scale=v, dropout=0.4, seed=seed)  # fmt: skip
                else:
                    y = lora_linear(xs, weight, bias, As, Bs, scale=SCALE, rank=5, rank_scale=v, dropout=0.4,
                                    seed=seed)  # fmt: skip
                grads = torch.autograd.grad(y, (xs, As, Bs), torch.ones_like(y))
            outs.append((y, *grads))
        for a, b in zip(*outs, strict=True):
            assert rel_err(a, b) < 1e-5


def test_dropout_mask_is_the_fused_ops_and_seeded():
    """The term of a one-hot A row is exactly the masked x column: the mask is ``dropout_mask(seed)``; the default
    seed comes from torch's generator (repeatable under manual_seed) and different seeds draw different masks."""
    M, K, N = 40, 24, 24
    x = torch.randn(M, K, dtype=torch.float64)
    A, B = torch.eye(K, dtype=torch.float64), torch.eye(N, dtype=torch.float64)  # rank K: term = scale * drop(x)
    term = lora_delta(None, x, A, B, scale=1.0, dropout=0.5, seed=SEED)
    mask = dropout_mask(SEED, (M, K), 0.5).double()
    assert torch.equal(term, x * mask)
    assert 0.3 < (mask == 0).double().mean() < 0.7
    torch.manual_seed(3)
    drawn = lora_delta(None, x, A, B, scale=1.0, dropout=0.5)
    torch.manual_seed(3)
    again = lora_delta(None, x, A, B, scale=1.0, dropout=0.5)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    assert torch.equal(drawn, again) and torch.equal(drawn, x * dropout_mask(seed, (M, K), 0.5).double())
    assert not torch.equal(term, lora_delta(None, x, A, B, scale=1.0, dropout=0.5, seed=SEED + 1))


@pytest.mark.parametrize("backend", kernel_backends())
def test_without_y_base_is_the_term_alone(backend):
    dtype = torch.float32
    y_base, x, A, B, v = make_inputs(9, 33, 21, 8, dtype, lead=(2,), rank_scale=True)
    with use_backend(backend):
        term = lora_delta(None, x, A, B, scale=SCALE, rank=6, rank_scale=v)
        full = lora_delta(y_base, x, A, B, scale=SCALE, rank=6, rank_scale=v)
    assert term.shape == y_base.shape
    assert rel_err(term + y_base, full) < 1e-6
    assert rel_err(full - y_base, term) < 1e-5


def test_y_base_alone_needs_no_adapter_backward(monkeypatch):
    """Only y_base trains: its gradient is dy, and no adapter backward runs."""
    y_base, x, A, B, _ = make_inputs(5, 12, 7, 4, torch.float64)
    monkeypatch.setattr(delta, "_lora_bwd", lambda *a, **k: pytest.fail("adapter backward ran"))
    y_base.requires_grad_()
    y = lora_delta(y_base, x, A, B, scale=SCALE)
    grad_out = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, (y_base,), grad_out)
    assert torch.equal(g, grad_out)


def test_one_d_x_and_empty_problems():
    y_base, x, A, B, _ = make_inputs(1, 12, 7, 4, torch.float64)
    y = lora_delta(y_base[0], x[0], A, B, scale=SCALE)
    assert y.shape == (7,) and rel_err(y, lora_delta(y_base, x, A, B, scale=SCALE)[0]) < 1e-15
    for M, K, N in ((0, 12, 7), (5, 0, 7), (5, 12, 0)):
        y_base, x, A, B, _ = make_inputs(M, K, N, 4, torch.float32)
        params = [t.requires_grad_() for t in (y_base, x, A, B)]
        with use_backend("triton" if "triton" in kernel_backends() else "torch"):
            y = lora_delta(y_base, x, A, B, scale=SCALE, dropout=0.2, seed=1)
            grads = torch.autograd.grad(y, params, torch.ones_like(y))
        assert y.shape == (M, N) and torch.equal(y, y_base)  # K = 0: the term is zero
        assert [g.shape for g in grads] == [t.shape for t in params]
        assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


def test_opcheck():
    """torch.library's consistency checks (schema, fake tensors, autograd registration) on the forward op."""
    y_base, x, A, B, v = make_inputs(5, 12, 7, 4, torch.float32, rank_scale=True)
    for t in (y_base, x, A, B, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lowrank_kernels.lora_delta_fwd.default, (y_base, x, A, B, v, 0.5, 3, 2, 0.0, None))
    torch.library.opcheck(torch.ops.lowrank_kernels.lora_delta_fwd.default, (None, x, A, B, None, 0.5, 4, 0, 0.0, None))


def test_compile_fullgraph():
    """torch.compile traces the registered forward and backward (aot_eager: no C++ compiler needed)."""
    y_base, x, A, B, v = make_inputs(6, 12, 7, 4, torch.float32, rank_scale=True)
    params = [t.requires_grad_() for t in (y_base, x, A, B, v)]

    def fn(y_base, x, A, B, v):
        return lora_delta(y_base, x, A, B, scale=SCALE, rank=3, rank_scale=v, frozen=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*params)
    grads = torch.autograd.grad(out, params, torch.ones_like(out))
    ref = fn(*params)
    ref_grads = torch.autograd.grad(ref, params, torch.ones_like(ref))
    assert rel_err(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-6


def test_bad_input_is_refused_clearly():
    y_base, x, A, B, v = make_inputs(5, 12, 7, 4, torch.float32, rank_scale=True)
    ok = dict(scale=SCALE)
    cases = [
        ((y_base, x[:, :11], A, B), ok, ValueError, "x's last dimension \\(11\\) must equal lora_A's in_features"),
        ((y_base, x, A, B[:, :3]), ok, ValueError, "lora_B must be \\[out_features, r\\]"),
        ((y_base, x, A[None], B), ok, ValueError, "lora_A must be 2-D"),
        ((y_base[:4], x, A, B), ok, ValueError, "y_base must be \\[\\*x.shape\\[:-1\\], out_features\\] = \\[5, 7\\]"),
        ((y_base[:, :6], x, A, B), ok, ValueError, "y_base must be"),
        ((y_base[None], x, A, B), ok, ValueError, "y_base must be"),
        ((y_base.double(), x, A, B), ok, TypeError, "y_base has dtype torch.float64 but x has torch.float32"),
        ((y_base.to("meta"), x, A, B), ok, ValueError, "y_base is on meta but x is on cpu"),
        ((y_base.int(), x, A, B), ok, TypeError, "y_base must be a floating-point tensor"),
        ((y_base.tolist(), x, A, B), ok, TypeError, "y_base must be a torch.Tensor, got list"),
        ((y_base, x, A.double(), B), ok, TypeError, "lora_A has dtype torch.float64"),
        ((y_base, x, A, B), dict(scale=SCALE, rank=5), ValueError, "rank must be in \\[1, 4\\]"),
        ((y_base, x, A, B), dict(scale=SCALE, rank=0), ValueError, "rank must be in \\[1, 4\\]"),
        ((y_base, x, A, B), dict(scale=SCALE, rank=2.0), TypeError, "rank must be an int"),
        ((y_base, x, A, B), dict(scale=SCALE, rank_scale=v[:3]), ValueError, "rank_scale must be \\[r\\] = \\[4\\]"),
        ((y_base, x, A, B), dict(scale=float("nan")), ValueError, "scale must be a finite number"),
        ((y_base, x, A, B), dict(scale=SCALE, dropout=1.0), ValueError, "dropout must be in \\[0, 1\\)"),
        ((y_base, x, A, B), dict(scale=SCALE, dropout=0.1, seed=-1), ValueError, "seed must be an int"),
        ((y_base, x, A[:0], B[:, :0]), ok, ValueError, "lora_A must have at least one rank"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            lora_delta(*args, **kwargs)


# ---- QLoRA layers: the adapter term runs on lora_delta -----------------------------------------------------------


def linear4bit(in_features=64, out_features=48, quant_type="nf4"):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                              quant_type=quant_type)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=quant_type)
    layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # .to() quantises


def dequantised(layer) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(
    "dropout, frozen", [(0.0, False), (0.3, False), (0.2, True)], ids=["plain", "dropout", "dropout-frozen"]
)
def test_qlora_layers_run_the_adapter_term_on_lora_delta(use_dora, dropout, frozen, monkeypatch):
    """LoRALinear4bit / DoRALinear4bit in training (dropout, DyLoRA's frozen rank) against the plain float64
    formula over bitsandbytes' dequantised weight, the dropout mask the seed drawn from torch's generator gives;
    the adapter term runs on lora_delta's orchestration."""
    from lowrank_kernels import DoRALinear, LoRALinear

    layer = (DoRALinear if use_dora else LoRALinear).from_linear(linear4bit(), 6, alpha=12.0, dropout=dropout)
    assert type(layer).__name__ == ("DoRALinear4bit" if use_dora else "LoRALinear4bit")
    torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    if use_dora:
        with torch.no_grad():
            layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 48))
    layer.set_rank(4, frozen=frozen)
    layer.train()
    calls = []
    forward = delta.delta_forward
    monkeypatch.setattr(delta, "delta_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))

    x = torch.randn(2, 5, 64, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    grad_out = torch.randn_like(y)
    params = [x, layer.lora_A.weight, layer.lora_B.weight] + ([layer.lora_magnitude_vector] if use_dora else [])
    grads = torch.autograd.grad(y, params, grad_out)
    assert calls == [1]

    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    mask = dropout_mask(seed, (10, 64), dropout).double().reshape(2, 5, 64) if dropout else 1.0
    W, bias = dequantised(layer.base_layer), layer.bias.double()
    d = [p.detach().double().requires_grad_() for p in params]
    xd, A, B = d[0] * mask, d[1][:4], d[2][:, :4]
    s = layer.scaling
    lora = s * (xd @ A.t()) @ B.t()
    y_base = d[0] @ W.t() + bias
    if use_dora:
        g = d[3] / torch.linalg.norm(W + s * (B @ A), dim=1).detach()
        y_ref = y_base + (g - 1) * (xd @ W.t()) + g * lora
    else:
        y_ref = y_base + lora
    grads_ref = torch.autograd.grad(y_ref, d, grad_out.double())
    assert rel_err(y, y_ref) < 1e-5
    lo = 3 if frozen else 0
    for name, gr, g_ref in zip(["x", "lora_A", "lora_B", "magnitude"], grads, grads_ref, strict=False):
        if name == "lora_A":
            g_ref[:lo] = 0
        elif name == "lora_B":
            g_ref[:, :lo] = 0
        assert rel_err(gr, g_ref) < 1e-5, name
    assert torch.count_nonzero(grads[1][4:]) == 0 and torch.count_nonzero(grads[1][:lo]) == 0
