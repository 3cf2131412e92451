"""Training many adapters in one mixed batch: the backward of the multi-adapter gather matmul, trainable pools.

Every gradient is checked against float64 autograd of the per-row spec (``multi_lora_linear_ref``), and training
is checked against what each adapter gets alone: ``LoRALinear`` / ``DoRALinear`` on its own rows, gradients and a
few optimizer steps. On CPU the Triton kernels run under the interpreter in float32.
"""

import types

import pytest
import torch
from helpers import DEVICE, REL_TOL, kernel_backends, rel_err
from torch import nn

from lowrank_kernels import AdapterBatch, DoRALinear, LoRALinear, MultiLoRALinear, dropout_mask, use_backend
from lowrank_kernels.modules.multi_lora import train_batch
from lowrank_kernels.ops.multi_lora import naive
from lowrank_kernels.ops.multi_lora.naive import AdapterWeights, multi_lora_linear_ref
from lowrank_kernels.ops.multi_lora.op import multi_lora_linear

# (backend, dtype): the torch path in float64 (exact claims) and float32, Triton in float32 (the interpreter).
CASES = [pytest.param("torch", torch.float64, id="torch-f64"), pytest.param("torch", torch.float32, id="torch-f32")]
CASES += [pytest.param(b, torch.float32, id=f"{b}-f32") for b in kernel_backends() if b != "torch"]
# Per-row scales are float32 in the batch metadata: a float64 run is good to ~1e-7, not 1e-12.
TOL = REL_TOL | {torch.float64: 1e-7}
K, N, MAX_RANK, CAPACITY = 24, 20, 8, 5
# slot -> (rank, alpha, rslora, dora); slot 3 stays empty.
SPECS = {0: (4, 8.0, False, False), 1: (3, 6.0, False, True), 2: (8, 4.0, True, False), 4: (2, 3.0, False, False)}
IDS = [2, 0, -1, 1, 0, 4, 2, 2, -1, 1, 0, 4, 1]  # unsorted, repeated, rows without adapter, slot 3 unused
RANKS = [5, 3, None, 3, 2, 1, 8, 2, None, 3, 4, 2, 3]  # per-row ranks (DyLoRA-style); DoRA rows at full rank


def make_layer(dtype, *, dropout=0.0, seed=0):
    """A trainable MultiLoRALinear with SPECS loaded (B non-zero, so every gradient is non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
        linear.bias.copy_(torch.randn(N, generator=g))
    layer = MultiLoRALinear.from_linear(linear, CAPACITY, MAX_RANK, trainable=True, dropout=dropout)
    names = {}
    for slot in range(CAPACITY):
        if slot not in SPECS:
            layer.add_adapter("placeholder", torch.zeros(1, K), torch.zeros(N, 1), 1.0)
            continue
        r, alpha, rslora, dora = SPECS[slot]
        A = torch.randn(r, K, generator=g) / K**0.5
        B = torch.randn(N, r, generator=g) / r**0.5
        m = torch.rand(N, generator=g) + 0.5 if dora else None
        assert layer.add_adapter(f"job{slot}", A, B, alpha, magnitude=m, rslora=rslora) == slot
        names[slot] = f"job{slot}"
    layer.remove_adapter("placeholder")  # slot 3: empty
    return layer, names


def leaves_f64(layer):
    """Each slot's adapter as float64 leaf tensors (the oracle's), in peft's layout; None for the empty slot."""
    out = [None] * CAPACITY
    for slot, name in ((s, f"job{s}") for s in SPECS):
        w = layer.pool.weights(name)
        A, B = (t.to(torch.float64).clone().requires_grad_() for t in (w.lora_A, w.lora_B))
        m = None if w.magnitude is None else w.magnitude.to(torch.float64).clone().requires_grad_()
        out[slot] = AdapterWeights(A, B, w.alpha, w.rslora, m)
    return out


def mixed_grads(backend, layer, x, ids, ranks, grad_out, *, dropout=0.0, seed=None):
    batch = AdapterBatch.build(layer.pool, ids, ranks)
    x = x.detach().clone().requires_grad_()
    with use_backend(backend):
        y = multi_lora_linear(x, layer.weight, layer.bias, layer.pool, batch, dropout=dropout, seed=seed)
        (y * grad_out).sum().backward()
    return y, x.grad


HALF_CASES = [pytest.param(b, torch.float16, id=f"{b}-f16") for b in kernel_backends()]


@pytest.mark.parametrize("backend, dtype", CASES + HALF_CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "dropout"])
def test_gradients_match_the_per_row_spec(backend, dtype, dropout):
    """dx, per-slot dA / dB (zero past each row's rank, for unused and empty slots) and DoRA's dm, against float64
    autograd of the per-row loop with the same dropout mask (a hash of (seed, row, col) over the batch's x)."""
    layer, _ = make_layer(dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(IDS), K, generator=g).to(DEVICE, dtype)
    grad_out = torch.randn(len(IDS), N, generator=g).to(DEVICE, dtype)
    y, dx = mixed_grads(backend, layer, x, IDS, RANKS, grad_out, dropout=dropout, seed=123)

    ref = leaves_f64(layer)
    x64 = x.to(torch.float64).requires_grad_()
    mask = dropout_mask(123, (len(IDS), K), dropout, DEVICE) if dropout else None
    y_ref = multi_lora_linear_ref(x64, layer.weight, layer.bias, IDS, ref, RANKS, dropout_mask=mask)
    (y_ref * grad_out.to(torch.float64)).sum().backward()
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(dx, x64.grad) < tol
    pool = layer.pool
    for slot in range(CAPACITY):
        dA, dB, dm = pool.lora_A.grad[slot], pool.lora_B.grad[slot], pool.magnitude.grad[slot]
        if slot not in SPECS:
            assert not dA.any() and not dB.any() and not dm.any(), "an empty slot got a gradient"
            continue
        r, dora = SPECS[slot][0], SPECS[slot][3]
        assert rel_err(dA[:r], ref[slot].lora_A.grad) < tol, slot
        assert rel_err(dB[:, :r], ref[slot].lora_B.grad) < tol, slot
        assert not dA[r:].any() and not dB[:, r:].any(), "ranks past the adapter's got a gradient"
        if dora:
            assert rel_err(dm, ref[slot].magnitude.grad) < tol
        else:
            assert not dm.any()
    # Ranks past every row's active rank: slot 0's rows use ranks 3, 2, 4 of its 4, so rank 3 gets only row 10's.
    assert pool.lora_A.grad[0, 3].abs().sum() > 0


@pytest.mark.parametrize("backend, dtype", CASES)
def test_unused_slots_and_rows_without_adapter(backend, dtype):
    """A batch that uses one adapter: every other slot's gradient is exactly zero; rows without adapter reach only
    dx (= dy W0); an all-base batch gives zero adapter gradients and launches no adapter kernel."""
    layer, _ = make_layer(dtype)
    ids = [-1, 0, -1, 0]
    x = torch.randn(4, K, dtype=dtype, device=DEVICE)
    grad_out = torch.randn(4, N, dtype=dtype, device=DEVICE)
    _, dx = mixed_grads(backend, layer, x, ids, None, grad_out)
    grads = layer.pool.lora_A.grad
    assert grads[0].abs().sum() > 0 and not grads[1:].any() and not layer.pool.lora_B.grad[1:].any()
    base_dx = grad_out.to(torch.float64) @ layer.weight.to(torch.float64)
    assert rel_err(dx[[0, 2]], base_dx[[0, 2]]) < TOL[dtype]
    layer.pool.zero_grad()
    _, dx = mixed_grads(backend, layer, x, [-1] * 4, None, grad_out)
    assert not layer.pool.lora_A.grad.any() and not layer.pool.lora_B.grad.any()
    assert rel_err(dx, base_dx) < TOL[dtype]


def alone_layers(layer, dtype):
    """Each job as its own LoRALinear / DoRALinear (peft's layout), on a copy of the base layer."""
    base = nn.Linear(K, N, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        base.bias.copy_(layer.bias)
    alone = {}
    for slot, (r, alpha, rslora, dora) in SPECS.items():
        cls = DoRALinear if dora else LoRALinear
        single = cls.from_linear(base, r, alpha=alpha, rslora=rslora)
        w = layer.pool.weights(f"job{slot}")
        with torch.no_grad():
            single.lora_A.weight.copy_(w.lora_A)
            single.lora_B.weight.copy_(w.lora_B)
            if dora:
                single.lora_magnitude_vector.copy_(w.magnitude)
        alone[slot] = single
    return alone


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("job_ranks", [False, True], ids=["full-rank", "job-ranks"])
def test_training_together_equals_training_alone(backend, dtype, job_ranks):
    """n adapters trained in one mixed batch (unsorted, repeated ids, rows without adapter, a DoRA slot, 3-D input:
    one id per sequence) get, each, the gradients and -- over a few Adam steps -- the weights of training it
    alone on its own rows with LoRALinear / DoRALinear. ``job_ranks``: jobs 0 and 2 train at a truncated rank
    (DyLoRA-style, per row), as LoRALinear.set_rank(b) alone."""
    layer, names = make_layer(dtype)
    alone = alone_layers(layer, dtype)
    seq_ids = [2, 0, -1, 1, 0, 4, 1]  # one per sequence of a [7, 3, K] input
    job_rank = {0: 2, 2: 5} if job_ranks else {}
    for slot, b in job_rank.items():
        alone[slot].set_rank(b)
    seq_ranks = [job_rank.get(a) for a in seq_ids]
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    opts = {s: torch.optim.Adam(m.parameters(), lr=1e-2) for s, m in alone.items()}
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(len(seq_ids), 3, K, generator=g).to(DEVICE, dtype)
        target = torch.randn(len(seq_ids), 3, N, generator=g).to(DEVICE, dtype)
        opt.zero_grad()
        with use_backend(backend), train_batch(layer, seq_ids, ranks=seq_ranks):
            ((layer(x) - target) ** 2).sum().backward()
        opt.step()
        for slot, single in alone.items():
            rows = [j for j, a in enumerate(seq_ids) if a == slot]
            opts[slot].zero_grad()
            ((single(x[rows]) - target[rows]) ** 2).sum().backward()
            r = SPECS[slot][0]
            tol = TOL[dtype]
            assert rel_err(layer.pool.lora_A.grad[slot, :r], single.lora_A.weight.grad) < tol
            assert rel_err(layer.pool.lora_B.grad[slot, :, :r], single.lora_B.weight.grad) < tol
            if SPECS[slot][3]:
                assert rel_err(layer.pool.magnitude.grad[slot], single.lora_magnitude_vector.grad) < tol
            opts[slot].step()
    for slot, single in alone.items():
        w = layer.pool.weights(names[slot])
        assert rel_err(w.lora_A, single.lora_A.weight) < 10 * TOL[dtype]
        assert rel_err(w.lora_B, single.lora_B.weight) < 10 * TOL[dtype]
        if SPECS[slot][3]:
            assert rel_err(w.magnitude, single.lora_magnitude_vector) < 10 * TOL[dtype]
    assert not layer.pool.lora_A[3].any() and not layer.pool.lora_A[0, 4:].any(), "unused entries moved"
    if job_ranks:  # ranks past a job's active rank got no gradient and kept their values
        assert not layer.pool.lora_A.grad[0, 2:].any() and not layer.pool.lora_B.grad[2, :, 5:].any()


def test_dora_norm_follows_the_trained_weights():
    """In training g_i is recomputed from the current A_i, B_i, m_i (not the value cached at load)."""
    layer, _ = make_layer(torch.float64)
    pool = layer.pool
    with torch.no_grad():
        pool.lora_B[1].mul_(3.0)
        pool.magnitude[1].add_(0.25)
    w = pool.weights("job1")
    s = naive.adapter_scale(w.alpha, SPECS[1][0])
    expected = w.magnitude / torch.linalg.vector_norm(layer.weight + s * (w.lora_B @ w.lora_A), dim=1)
    assert rel_err(pool.magnitude_scale[1], expected) < 1e-12
    assert (pool.magnitude_scale[[0, 2, 3, 4]] == 1).all()


@pytest.mark.parametrize("backend, dtype", CASES)
def test_module_dropout_only_in_training(backend, dtype):
    """MultiLoRALinear(dropout=p): the mask in train mode (same seed -> same output), none in eval mode."""
    layer, _ = make_layer(dtype, dropout=0.4)
    x = torch.randn(len(IDS), K, dtype=dtype, device=DEVICE)
    with use_backend(backend), torch.no_grad():
        torch.manual_seed(0)
        y1 = layer(x, IDS, RANKS)
        torch.manual_seed(0)
        y2 = layer(x, IDS, RANKS)
        layer.eval()
        y_eval = layer(x, IDS, RANKS)
    assert rel_err(y1, y2) < TOL[dtype] and rel_err(y1, y_eval) > 1e-3
    y_ref = multi_lora_linear_ref(x, layer.weight, layer.bias, IDS, leaves_f64(layer), RANKS)
    assert rel_err(y_eval, y_ref) < TOL[dtype]


@pytest.mark.parametrize("backend, dtype", CASES)
def test_strided_views_of_x_and_the_pool(backend, dtype):
    """x and the pool's stacked tensors as non-contiguous views give the contiguous results (a duck-typed pool)."""
    layer, _ = make_layer(dtype)
    pool = layer.pool
    g = torch.Generator().manual_seed(5)
    x = torch.randn(len(IDS), K, generator=g).to(DEVICE, dtype)
    grad_out = torch.randn(len(IDS), N, generator=g).to(DEVICE, dtype)
    _, dx = mixed_grads(backend, layer, x, IDS, RANKS, grad_out)
    expected = [pool.lora_A.grad.clone(), pool.lora_B.grad.clone()]
    # The same values behind other strides: A as a transposed store, B every other column of a wider buffer.
    A = pool.lora_A.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    B_wide = torch.zeros(CAPACITY, N, 2 * MAX_RANK, dtype=dtype, device=DEVICE)
    B_wide[:, :, ::2] = pool.lora_B.detach()
    B = B_wide[:, :, ::2].requires_grad_()
    strided = types.SimpleNamespace(lora_A=A, lora_B=B, magnitude_scale=pool.magnitude_scale.detach(),
                                    dora_slots=pool.dora_slots, signature=pool.signature, in_features=K,
                                    out_features=N)  # fmt: skip
    x_wide = torch.zeros(len(IDS), 2 * K, dtype=dtype, device=DEVICE)
    x_wide[:, 1::2] = x
    xs = x_wide[:, 1::2].requires_grad_()
    batch = AdapterBatch.build(pool, IDS, RANKS)
    with use_backend(backend):
        y = multi_lora_linear(xs, layer.weight, layer.bias, strided, batch)
        (y * grad_out).sum().backward()
    assert not A.is_contiguous() and not B.is_contiguous() and not xs.is_contiguous()
    assert rel_err(xs.grad, dx) < TOL[dtype]
    assert rel_err(A.grad, expected[0]) < TOL[dtype] and rel_err(B.grad, expected[1]) < TOL[dtype]


@pytest.mark.parametrize(
    "ids, ranks, error, match",
    [
        pytest.param([0, 5], None, ValueError, "out of range", id="id-out-of-range"),
        pytest.param([0, 3], None, ValueError, "empty slot", id="empty-slot"),
        pytest.param([0, 2], [5, 9], ValueError, "outside", id="rank-above-adapter"),
        pytest.param([1, 0], [2, None], ValueError, "truncates the DoRA", id="dora-truncated"),
    ],
)
def test_bad_batches_raise_before_any_kernel(ids, ranks, error, match, monkeypatch):
    layer, _ = make_layer(torch.float32)

    def fail(*args, **kwargs):
        raise AssertionError("a primitive ran on a bad batch")

    for name in ("segment_shrink", "segment_expand", "segment_weight_grad"):
        monkeypatch.setattr(naive, name, fail)
    with pytest.raises(error, match=match):
        with train_batch(layer, ids, ranks):
            layer(torch.randn(len(ids), K))


def test_compile_fullgraph_forward_and_backward():
    """torch.compile(fullgraph=True) of a model with a trainable pool traces forward and backward (torch backend)."""
    layer, _ = make_layer(torch.float32)
    model = nn.Sequential(layer, nn.Tanh())
    batch = AdapterBatch.build(layer.pool, IDS, RANKS)
    x = torch.randn(len(IDS), K)

    def step(x):
        return model[1](model[0](x, batch)).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    compiled(x).backward()
    got = [layer.pool.lora_A.grad.clone(), layer.pool.lora_B.grad.clone(), layer.pool.magnitude.grad.clone()]
    layer.pool.zero_grad()
    step(x).backward()
    want = [layer.pool.lora_A.grad, layer.pool.lora_B.grad, layer.pool.magnitude.grad]
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < REL_TOL[torch.float32]


def test_training_benchmark_providers_agree_on_cpu():
    """The training benchmark's providers (benchmarks/test_multi_lora_bench.py) at tiny sizes: one mixed batch of
    4 jobs gives the gradients of 4 separate LoRALinear steps and of peft's per-job loop."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "test_multi_lora_bench.py"
    spec = importlib.util.spec_from_file_location("multi_lora_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve their module by name
    spec.loader.exec_module(bench)
    worst = bench.check_train_providers(4, 40, 24, 20, 4, device="cpu", dtype=torch.float32, tol=1e-5)
    assert worst < 1e-5


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_save_one_adapter_of_a_trained_pool_for_peft(tmp_path, kind):
    """save_peft_adapter(model, path, adapter_name=...) writes one adapter of the trained pools as a peft directory
    that peft.PeftModel.from_pretrained loads with equal logits (the pools' other adapters left out)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    import copy

    from helpers import tiny_llama

    from lowrank_kernels import save_peft_adapter, serve_batch

    base = tiny_llama().eval()
    model = copy.deepcopy(base).requires_grad_(False)  # only the pools train
    g = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
            layer = MultiLoRALinear.from_linear(module, 2, 8, trainable=True)
            for job, r in (("other", 8), ("job", 4)):
                A = torch.randn(r, module.in_features, generator=g) / module.in_features**0.5
                B = torch.randn(module.out_features, r, generator=g) * 0.2
                m = torch.rand(module.out_features, generator=g) + 0.5 if kind == "dora" and job == "job" else None
                layer.add_adapter(job, A, B, alpha=8.0, magnitude=m, rslora=kind == "rslora" and job == "job")
            model.set_submodule(name, layer)
    tokens = torch.randint(0, 64, (2, 9), generator=g)
    with train_batch(model, ["job", "other"]):  # one training step, so the saved weights are trained ones
        model(tokens).logits.square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    names = save_peft_adapter(model, tmp_path / "job", adapter_name="job")
    assert len(names) == 6
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "job")).eval()
    with torch.no_grad(), serve_batch(model, ["job", "job"]):
        ours = model(tokens).logits
    with torch.no_grad():
        theirs = loaded(tokens).logits
    assert rel_err(ours, theirs) < REL_TOL[torch.float32]
    assert all(isinstance(m, MultiLoRALinear) for n, m in model.named_modules() if n.endswith("q_proj"))
    with pytest.raises(KeyError, match="no MultiLoRALinear pool"):
        save_peft_adapter(model, tmp_path / "x", adapter_name="missing")


def test_opcheck_training_ops():
    """The training forward (dropout, DoRA with z saved), its backward op and the pool norm op pass opcheck: schemas,
    fake implementations and the autograd registration."""
    layer, _ = make_layer(torch.float32)
    pool = layer.pool
    batch = AdapterBatch.build(pool, IDS, RANKS)
    x = torch.randn(len(IDS), K, requires_grad=True)
    seed = torch.tensor(5, dtype=torch.int64)
    g = pool.magnitude_scale.detach().requires_grad_()
    args = (x, layer.weight, layer.bias, pool.lora_A, pool.lora_B, g, pool.dora_slots, batch.row_slot, batch.row_rank,
            batch.row_scale, batch.sorted_rows, batch.tiles, batch.slot_rows, batch.block_m, batch.has_adapter,
            batch.has_dora, 0.25, seed, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.lowrank_kernels.multi_lora_fwd.default, args)
    norm_args = (layer.weight, pool.lora_A.detach(), pool.lora_B.detach(), [1], [2.0], [3])
    torch.library.opcheck(torch.ops.lowrank_kernels.multi_lora_norm.default, norm_args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_training_realistic(backend, dtype):
    """Long segments (many row tiles per adapter), K splits and 16-bit inputs on the device: the kernels' dx, dA, dB
    against the torch backend in float32 on the same inputs."""
    from lowrank_kernels import AdapterPool

    M, Kb, Nb, n, r = 1536, 1024, 768, 4, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(Nb, Kb, device="cuda", generator=g) / Kb**0.5
    pools = {}
    for dt in (dtype, torch.float32):
        pool = AdapterPool(Kb, Nb, n, r, dtype=dt, device="cuda", base_weight=W.to(dt), trainable=True)
        gg = torch.Generator(device="cuda").manual_seed(1)
        for i in range(n):
            A = torch.randn(r, Kb, device="cuda", generator=gg) / Kb**0.5
            B = torch.randn(Nb, r, device="cuda", generator=gg) / r**0.5
            pool.add(f"a{i}", A, B, 2.0 * r, magnitude=(W.norm(dim=1) if i == 1 else None))
        pools[dt] = pool
    ids = (torch.randperm(M, generator=torch.Generator().manual_seed(2)) % (n + 1) - 1).tolist()
    x = torch.randn(M, Kb, device="cuda", generator=g)
    dy = torch.randn(M, Nb, device="cuda", generator=g)
    out = {}
    for dt, name in ((dtype, backend), (torch.float32, "torch")):
        pool = pools[dt]
        xi = x.to(dt).requires_grad_()
        with use_backend(name):
            y = multi_lora_linear(xi, W.to(dt), None, pool, AdapterBatch.build(pool, ids), dropout=0.1, seed=4)
            y.backward(dy.to(dt))
        out[name] = (y, xi.grad, pool.lora_A.grad, pool.lora_B.grad, pool.magnitude.grad)
    for got, want in zip(out[backend], out["torch"], strict=True):
        assert rel_err(got, want) < REL_TOL[dtype]


def test_adapter_state_in_peft_layout_and_parameters():
    """A trainable pool's tensors are parameters (one optimizer trains every adapter); adapter_state gives one
    adapter back in peft's layout (detached copies at its own rank)."""
    layer, _ = make_layer(torch.float32)
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"pool.lora_A", "pool.lora_B", "pool.magnitude"}  # W0 and bias stay frozen
    lora, dora = layer.adapter_state("job2"), layer.adapter_state("job1")
    assert set(lora) == {"lora_A.weight", "lora_B.weight"}
    assert set(dora) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    assert lora["lora_A.weight"].shape == (8, K) and dora["lora_B.weight"].shape == (N, 3)
    assert torch.equal(dora["lora_magnitude_vector"], layer.pool.magnitude[1].detach())
    dora["lora_A.weight"].zero_()  # a copy: the pool is untouched
    assert layer.pool.lora_A[1, :3].abs().sum() > 0
