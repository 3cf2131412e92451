"""Every tensor argument of every public op, in any layout, gives the right answer on every backend.

A kernel that assumes contiguity gives a silent wrong answer, the worst kind: each argument in turn is passed as a
transposed, a stride-2 and an expanded (stride 0) view, and the output and every gradient are compared with the
float64 oracle run on the same values. The views are made by differentiable ops from a leaf, so the gradients are
those of the leaf, whatever the layout.
"""

import pytest
import torch
from helpers import DEVICE, REL_TOL, kernel_backends, make_lora_inputs, rel_err

from lowrank_kernels import (
    AdapterBatch,
    AdapterPool,
    dora_linear,
    dora_weight_norm,
    lora_linear,
    multi_lora_linear,
    use_backend,
)
from lowrank_kernels.ops.dora.naive import dora_linear_ref
from lowrank_kernels.ops.lora.naive import dropout_mask, lora_linear_ref
from lowrank_kernels.ops.multi_lora.naive import AdapterWeights, multi_lora_linear_ref


def transposed(t):  # same values, the other memory order
    return t.t().contiguous().t() if t.dim() == 2 else None


def step2(t):  # same values, every other element of a wider buffer
    return torch.stack([t, t], -1).flatten(-2)[..., ::2]


def expanded(t):  # stride 0 along the first dimension (new values: the first row, or the first entry, repeated)
    return t[:1].expand_as(t)


LAYOUTS = {"transposed": transposed, "step2": step2, "expanded": expanded}
SCALE, RANK = 0.7, 3
VECTORS = {"bias", "rank_scale", "magnitude", "weight_norm", "weight_norm_sq"}
CACHES = {"weight_norm", "weight_norm_sq"}  # an expanded cache is another weight's cache: not a layout of these


def arg_layouts(args):
    """(argument, layout) pairs that apply: 1-D arguments have no transposed layout."""
    return [pytest.param(a, lay, id=f"{a}-{lay}") for a in args for lay in LAYOUTS
            if not (a in VECTORS and lay == "transposed") and not (a in CACHES and lay == "expanded")]  # fmt: skip


def check_layouts(op_fn, ref_fn, base: dict, arg: str, layout: str, grad_names, backend, dtype=torch.float32):
    """Compare op_fn(**args) with ref_fn(**args) in float64, ``arg`` passed through ``LAYOUTS[layout]``."""
    make = LAYOUTS[layout]

    def build(dt):
        leaves = {k: None if v is None else v.detach().to(dt).requires_grad_(k in grad_names) for k, v in base.items()}
        args = dict(leaves)
        args[arg] = make(leaves[arg])
        return leaves, args

    leaves, args = build(dtype)
    assert not args[arg].is_contiguous()
    with use_backend(backend):
        y = op_fn(**args)
        grad_out = torch.randn_like(y)
        wanted = [leaves[k] for k in grad_names]
        grads = torch.autograd.grad(y, wanted, grad_out) if wanted else ()
    ref_leaves, ref_args = build(torch.float64)
    y_ref = ref_fn(**ref_args)
    grads_ref = torch.autograd.grad(y_ref, [ref_leaves[k] for k in grad_names], grad_out.double()) if wanted else ()
    tol = REL_TOL[dtype]
    assert rel_err(y, y_ref) < tol, f"output with {arg} {layout}"
    for name, g, g_ref in zip(grad_names, grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < tol, f"d{name} with {arg} {layout}"


def lora_base(M):
    x, weight, bias, A, B, v = make_lora_inputs(M, 24, 16, 5, torch.float64, rank_scale=True)
    return dict(x=x, weight=weight, bias=bias, lora_A=A, lora_B=B, rank_scale=v)


LORA_ARGS = ["x", "weight", "bias", "lora_A", "lora_B", "rank_scale"]
SIZES = [pytest.param(5, id="decode-M5"), pytest.param(70, id="prefill-M70")]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("M", SIZES)
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["plain", "dropout"])
@pytest.mark.parametrize("arg, layout", arg_layouts(LORA_ARGS))
def test_lora_linear_any_layout(arg, layout, dropout, M, backend):
    def op(**a):
        return lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], scale=SCALE, rank=RANK,
                           rank_scale=a["rank_scale"], dropout=dropout, seed=11)  # fmt: skip

    def ref(**a):
        mask = dropout_mask(11, tuple(a["x"].shape), dropout, a["x"].device) if dropout else None
        return lora_linear_ref(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], SCALE, RANK, a["rank_scale"],
                               mask)  # fmt: skip

    check_layouts(op, ref, lora_base(M), arg, layout, LORA_ARGS, backend)


DORA_ARGS = ["x", "weight", "bias", "lora_A", "lora_B", "magnitude"]


def dora_base(M):
    base = lora_base(M)
    del base["rank_scale"]
    base["magnitude"] = torch.rand(16, dtype=torch.float64, device=DEVICE) + 0.5
    return base


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("M", SIZES)
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["plain", "dropout"])
@pytest.mark.parametrize("arg, layout", arg_layouts(DORA_ARGS + ["weight_norm", "weight_norm_sq"]))
def test_dora_linear_any_layout(arg, layout, dropout, M, backend):
    """DoRA's tensors, and the optional cached norms (constants to autograd) in any layout."""
    base = dora_base(M)
    W, A, B = base["weight"], base["lora_A"], base["lora_B"]
    if arg == "weight_norm":
        base[arg] = torch.linalg.vector_norm(W + SCALE * (B[:, :RANK] @ A[:RANK]), dim=1)
    elif arg == "weight_norm_sq":
        base[arg] = W.square().sum(1)
    cached = arg if arg in ("weight_norm", "weight_norm_sq") else None

    def op(**a):
        kw = {cached: a[cached].float()} if cached else {}
        return dora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], scale=SCALE,
                           rank=RANK, dropout=dropout, seed=11, **kw)  # fmt: skip

    def ref(**a):
        mask = dropout_mask(11, tuple(a["x"].shape), dropout, a["x"].device) if dropout else None
        return dora_linear_ref(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], SCALE, RANK,
                               mask)  # fmt: skip

    check_layouts(op, ref, base, arg, layout, DORA_ARGS, backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("arg, layout", arg_layouts(["weight", "lora_A", "lora_B", "weight_norm_sq"]))
def test_dora_weight_norm_any_layout(arg, layout, backend):
    base = dora_base(4)
    base["weight_norm_sq"] = base["weight"].square().sum(1)

    def op(**a):
        cache = a["weight_norm_sq"] if arg == "weight_norm_sq" else a["weight"].square().sum(1)
        return dora_weight_norm(a["weight"], a["lora_A"], a["lora_B"], scale=SCALE, rank=RANK,
                                weight_norm_sq=cache.float())  # fmt: skip

    def ref(**a):
        W, A, B = a["weight"], a["lora_A"], a["lora_B"]
        return torch.linalg.vector_norm(W + SCALE * (B[:, :RANK] @ A[:RANK]), dim=1)

    check_layouts(op, ref, base, arg, layout, [], backend)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("arg, layout", arg_layouts(["x", "weight", "bias"]))
def test_multi_lora_linear_any_layout(arg, layout, backend):
    """The gather matmul with LoRA and DoRA rows (DoRA rows' bias too) and a row without adapter."""
    torch.manual_seed(0)
    K, N = 24, 16
    linear = torch.nn.Linear(K, N, dtype=torch.float32).to(DEVICE)
    pool = AdapterPool.for_linear(linear, 3, 4)
    dora = AdapterWeights(torch.randn(2, K) / 5, torch.randn(N, 2) / 2, 4.0, magnitude=torch.rand(N) + 0.5)
    adapters = [AdapterWeights(torch.randn(4, K) / 5, torch.randn(N, 4) / 2, 8.0), dora]
    for i, ad in enumerate(adapters):
        pool.add(f"a{i}", ad.lora_A.to(DEVICE), ad.lora_B.to(DEVICE), ad.alpha,
                 magnitude=None if ad.magnitude is None else ad.magnitude.to(DEVICE))  # fmt: skip
    ids = [0, 1, -1, 1, 0]
    batch = AdapterBatch.build(pool, ids)
    base = dict(x=torch.randn(5, K, device=DEVICE), weight=linear.weight.detach(), bias=linear.bias.detach())

    def op(**a):
        return multi_lora_linear(a["x"], a["weight"], a["bias"], pool, batch)

    def ref(**a):
        stored = [pool.weights(f"a{i}") for i in range(2)]
        return multi_lora_linear_ref(a["x"], a["weight"], a["bias"], ids, stored)

    if layout == "expanded" and arg == "weight":  # the pool's DoRA g belongs to its own W0: the reference's too
        ids = [0, 0, -1, 0, 0]
        batch = AdapterBatch.build(pool, ids)
    check_layouts(op, ref, base, arg, layout, [], backend)
