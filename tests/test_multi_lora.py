"""Mixed-adapter batched inference: AdapterPool, AdapterBatch, multi_lora_linear, MultiLoRALinear, serve_batch.

Every output is checked against the per-row reference loop (``multi_lora_linear_ref``, float64, DoRA's norm from the
materialised ``W0 + s B A``). On CPU the Triton kernels run under the interpreter (small shapes, float32/float16); on
a GPU the same cases run on the device, plus the GPU-marked realistic sizes in bf16 and the CUDA-graph test.
"""

import math

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, REL_TOL, kernel_backends, kernel_dtypes, rel_err
from torch import nn

from lowrank_kernels import AdapterBatch, AdapterPool, BackendUnavailableError, lora_linear, use_backend
from lowrank_kernels.modules.multi_lora import MultiLoRALinear, serve_batch
from lowrank_kernels.ops.dora.naive import row_norm
from lowrank_kernels.ops.multi_lora.batch import max_tiles
from lowrank_kernels.ops.multi_lora.naive import (
    ADAPTER_MIXES,
    adapter_mix,
    multi_lora_forward,
    multi_lora_linear_ref,
)
from lowrank_kernels.ops.multi_lora.op import multi_lora_linear

CASES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in kernel_backends()
    for dtype in kernel_dtypes(backend)
    if dtype != torch.float64 or backend == "torch"
]
# (rank, DoRA, rsLoRA) per slot: heterogeneous ranks (1 .. Rmax), one DoRA and one rsLoRA adapter among them.
# Per-row scales are float32 in the batch metadata (what the kernels read): a float64 run is good to ~1e-7, not 1e-12.
TOL = REL_TOL | {torch.float64: 1e-7}
ADAPTERS = [(8, False, False), (16, True, False), (3, False, True), (1, False, False), (12, False, False)]
MAX_RANK = 16


def make_linear(K=70, N=33, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
        if bias:
            linear.bias.copy_(torch.randn(N, generator=g))
    return linear.requires_grad_(False)  # serving: frozen


def random_adapter(K, N, r, *, dora=False, seed=0):
    """(lora_A [r, K], lora_B [N, r], magnitude [N] | None): the adapter term O(1) like the base (B is not zero)."""
    g = torch.Generator().manual_seed(1000 + seed)
    A = torch.randn(r, K, generator=g) * K**-0.5
    B = torch.randn(N, r, generator=g) * r**-0.5
    m = torch.rand(N, generator=g) + 0.5 if dora else None
    return A, B, m


def fill_pool(pool, specs=ADAPTERS, *, capacity_spare=True):
    """Load ``specs`` into ``pool`` as adapters "a0", "a1", ...; returns the reference's adapter list, by slot."""
    for i, (r, dora, rslora) in enumerate(specs):
        A, B, m = random_adapter(pool.in_features, pool.out_features, r, dora=dora, seed=i)
        pool.add(f"a{i}", A, B, alpha=2.0 * r + i, magnitude=m, rslora=rslora)
    return reference_adapters(pool)


def reference_adapters(pool):
    """What the oracle needs: each slot's adapter as stored (the pool's dtype), or None for an empty slot."""
    by_slot = [None] * pool.capacity
    for name, slot in pool.names.items():
        by_slot[slot] = pool.weights(name)
    return by_slot


def make_x(M, K, dtype, lead=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (M, K) if lead is None else (*lead, K)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def check(backend, dtype, linear, pool, adapters, ids, ranks=None, x=None, M=None):
    """Run multi_lora_linear for ``ids`` and compare with the per-row loop. Returns (y, batch)."""
    M = len(ids) if M is None else M
    x = make_x(M, linear.in_features, dtype) if x is None else x
    batch = AdapterBatch.build(pool, ids, ranks)
    with use_backend(backend):
        y = multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    ids_int = batch.row_slot.tolist()
    row_ranks = [None if ranks is None else (ranks if isinstance(ranks, int) else ranks[t]) for t in range(M)]
    y_ref = multi_lora_linear_ref(x, linear.weight, linear.bias, ids_int, adapters, row_ranks)
    assert y.dtype == dtype and y.shape == (M, linear.out_features)
    assert rel_err(y, y_ref) < TOL[dtype], rel_err(y, y_ref)
    return y, batch


def make_setup(dtype, K=70, N=33, bias=True, specs=ADAPTERS, capacity=6):
    linear = make_linear(K, N, dtype, bias)
    pool = AdapterPool.for_linear(linear, capacity, MAX_RANK)
    return linear, pool, fill_pool(pool, specs)


# ---- the op against the per-row loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("mix", ADAPTER_MIXES)
@pytest.mark.parametrize("M", [1, 7, 40])
def test_mixes_decode(backend, dtype, mix, M, poison_empty):
    """Punica's adapter mixes at decode sizes (one row per request), LoRA, rsLoRA and DoRA adapters in one pool."""
    linear, pool, adapters = make_setup(dtype)
    check(backend, dtype, linear, pool, adapters, adapter_mix(mix, M, len(ADAPTERS), seed=M))


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("mix", ["identical", "zipf", "some-none"])
def test_mixes_prefill_sized(backend, dtype, mix, poison_empty):
    """M = 300 rows: above 256 the kernels' row tiles are 64 rows, so long segments span several tiles."""
    linear, pool, adapters = make_setup(dtype, K=40, N=24)
    check(backend, dtype, linear, pool, adapters, adapter_mix(mix, 300, len(ADAPTERS), seed=3))


@pytest.mark.parametrize("backend, dtype", CASES)
def test_truncated_ranks_per_row(backend, dtype, poison_empty):
    """DyLoRA serving: each request picks its own rank b_t <= r_i (scale alpha / b_t); a tile mixes ranks."""
    linear, pool, adapters = make_setup(dtype, specs=[(16, False, False), (8, False, True), (5, False, False)])
    g = torch.Generator().manual_seed(5)
    ids = adapter_mix("some-none", 37, 3, seed=5)
    ranks = [None if i < 0 else int(torch.randint(1, adapters[i].lora_A.shape[0] + 1, (), generator=g)) for i in ids]
    _, batch = check(backend, dtype, linear, pool, adapters, ids, ranks)
    assert batch.row_rank.tolist() == [0 if r is None else r for r in ranks]


@pytest.mark.parametrize("backend, dtype", CASES)
def test_ranks_past_one_rank_block_and_k_splits(backend, dtype, poison_empty):
    """max_rank 80: two rank blocks of 64 (the second skipped by tiles of rank <= 64); K = 300: the shrink splits K."""
    specs = [(70, False, False), (5, False, False), (64, True, False), (80, False, True)]
    linear = make_linear(300, 40, dtype)
    pool = AdapterPool.for_linear(linear, 5, 80)
    adapters = fill_pool(pool, specs)
    ids = [0, 1, 2, 3, 0, -1, 3, 2, 1, 0]
    check(backend, dtype, linear, pool, adapters, ids, [66, None, None, 33, 70, None, 80, None, 2, 1])
    if backend == "triton":
        from lowrank_kernels.ops.multi_lora.triton import _k_splits

        assert _k_splits(max_tiles(10, 5), 2, 300, 128, linear.weight.device) > 1


@pytest.mark.parametrize("backend, dtype", CASES)
def test_strided_input(backend, dtype):
    """x a column-strided view (and column-major): the kernels gather rows through x's strides."""
    linear, pool, adapters = make_setup(dtype)
    wide = make_x(9, 140, dtype)
    ids = adapter_mix("uniform", 9, len(ADAPTERS), seed=9)
    for x in (wide[:, ::2], wide[:, :70].t().contiguous().t()):
        check(backend, dtype, linear, pool, adapters, ids, x=x)


@pytest.mark.parametrize("backend, dtype", CASES)
def test_one_rank_for_every_row(backend, dtype):
    linear, pool, adapters = make_setup(dtype, specs=[(16, False, False), (8, False, False)])
    check(backend, dtype, linear, pool, adapters, [0, 1, 1, -1, 0], ranks=4)


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dora_and_lora_in_one_batch(backend, dtype, bias, poison_empty):
    """DoRA rows are g_i * (x W0^T + s x A^T B^T) + bias: g scales the base term too, the bias stays outside."""
    specs = [(8, True, False), (4, False, False), (16, True, True), (2, False, True)]
    linear, pool, adapters = make_setup(dtype, bias=bias, specs=specs)
    ids = [0, 1, 2, 3, -1, 2, 0, 0, 1, 3, 2, -1, 0]
    y, _ = check(backend, dtype, linear, pool, adapters, ids)
    # The tolerance sees a missing g: drop DoRA from the oracle and the output no longer matches.
    x = make_x(len(ids), linear.in_features, dtype)
    no_dora = [a._replace(magnitude=None) for a in adapters[:4]] + [None] * 2
    wrong = multi_lora_linear_ref(x, linear.weight, linear.bias, ids, no_dora)
    assert rel_err(y, wrong) > 10 * TOL[dtype]


@pytest.mark.parametrize("backend, dtype", CASES)
def test_rows_without_adapter_are_the_base_layer(backend, dtype):
    """Rows with id -1 are x W0^T + bias; with the kernels bitwise F.linear's (no adapter kernel writes them)."""
    linear, pool, adapters = make_setup(dtype)
    ids = adapter_mix("some-none", 30, len(ADAPTERS), seed=2)
    y, batch = check(backend, dtype, linear, pool, adapters, ids)
    x = make_x(30, linear.in_features, dtype)
    none = torch.tensor(ids, device=DEVICE) < 0
    assert none.any()
    grouped = batch.sorted_rows[: int((~none).sum())].tolist()  # the rows the tiles cover come first
    assert sorted(grouped) == (~none).nonzero().flatten().tolist()
    if backend == "triton":  # the torch backend adds the bias after its own GEMM: equal within rounding only
        assert torch.equal(y[none], nn.functional.linear(x, linear.weight, linear.bias)[none])


@pytest.mark.parametrize("backend", kernel_backends())
def test_all_rows_without_adapter_launch_nothing(backend, monkeypatch):
    """A batch with no adapter row runs F.linear alone: no backend is called."""
    import lowrank_kernels.ops.multi_lora.op as op

    def fail(*args):
        raise AssertionError("an adapter implementation ran for a batch without adapters")

    monkeypatch.setattr(op, "implementation", fail)
    linear, pool, _ = make_setup(torch.float32)
    batch = AdapterBatch.build(pool, [-1, None, -1])
    x = make_x(3, linear.in_features, torch.float32)
    with use_backend(backend):
        y = multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    assert not batch.has_adapter and batch.num_tiles == 0
    assert torch.equal(y, nn.functional.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("backend", kernel_backends())
def test_one_adapter_matches_lora_linear(backend):
    """Every row on one adapter is the single-adapter LoRA op (same weights, same scale, truncated rank too)."""
    dtype = torch.float32
    linear, pool, adapters = make_setup(dtype, specs=[(12, False, False)])
    A, B = adapters[0].lora_A, adapters[0].lora_B
    x = make_x(9, linear.in_features, dtype)
    for rank in (None, 5):
        with use_backend(backend):
            y = multi_lora_linear(x, linear.weight, linear.bias, pool, AdapterBatch.build(pool, [0] * 9, rank))
            b = rank or 12
            y_lora = lora_linear(x, linear.weight, linear.bias, A, B, scale=adapters[0].alpha / b, rank=b)
        torch.testing.assert_close(y, y_lora, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, dtype", CASES)
def test_prefill_3d_per_sequence_ids(backend, dtype, poison_empty):
    """x [batch, seq, K] with one id (and rank) per sequence; the functional op and MultiLoRALinear agree."""
    linear = make_linear(dtype=dtype)
    layer = MultiLoRALinear.from_linear(linear, 6, MAX_RANK)
    pool = layer.pool
    adapters = fill_pool(pool)
    x = make_x(0, linear.in_features, dtype, lead=(4, 5))
    ids, ranks = [2, -1, 1, 2], [2, None, None, 1]
    batch = AdapterBatch.build(pool, ids, ranks, seq_lens=5)
    assert batch.num_rows == 20 and batch.num_segments == 2
    with use_backend(backend):
        y = multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    row_ids = [i for i in ids for _ in range(5)]
    row_ranks = [r for r in ranks for _ in range(5)]
    y_ref = multi_lora_linear_ref(x.reshape(20, -1), linear.weight, linear.bias, row_ids, adapters, row_ranks)
    assert y.shape == (4, 5, linear.out_features)
    assert rel_err(y.reshape(20, -1), y_ref) < TOL[dtype]
    with use_backend(backend):
        torch.testing.assert_close(layer(x, ids, ranks), y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_packed_variable_length_sequences(backend):
    """Packed prefill: x [sum(seq_lens), K] with ragged runs of rows per request (SGMV's segments)."""
    dtype = torch.float32
    linear, pool, adapters = make_setup(dtype)
    ids, lens = [3, 0, -1, 3, 4], [2, 17, 3, 1, 9]
    batch = AdapterBatch.build(pool, ids, seq_lens=lens)
    x = make_x(sum(lens), linear.in_features, dtype)
    with use_backend(backend):
        y = multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    row_ids = [i for i, n in zip(ids, lens, strict=True) for _ in range(n)]
    y_ref = multi_lora_linear_ref(x, linear.weight, linear.bias, row_ids, adapters)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert batch.num_segments == 3  # adapter 3's two requests share one segment (read once)


@pytest.mark.parametrize("backend", kernel_backends())
def test_empty_batch(backend):
    linear, pool, _ = make_setup(torch.float32)
    batch = AdapterBatch.build(pool, [])
    with use_backend(backend):
        y = multi_lora_linear(make_x(0, 70, torch.float32), linear.weight, linear.bias, pool, batch)
    assert y.shape == (0, 33)


def test_float64_runs_on_torch_and_refuses_triton_by_name():
    """Triton takes 16/32-bit floats: float64 runs on the reference, or raises when Triton is asked for by name."""
    linear, pool, adapters = make_setup(torch.float64)
    check("torch", torch.float64, linear, pool, adapters, [0, 1, -1])
    if "triton" in kernel_backends():
        batch = AdapterBatch.build(pool, [0, 1, -1])
        with use_backend("triton"), pytest.raises(BackendUnavailableError, match="float16/bfloat16/float32"):
            multi_lora_linear(make_x(3, 70, torch.float64), linear.weight, linear.bias, pool, batch)


@pytest.mark.parametrize("backend", kernel_backends())
def test_tolerance_catches_a_wrong_rank(backend):
    """The comparisons above are tight enough that rank b - 1 cannot pass for rank b."""
    dtype = torch.float16 if backend == "triton" else torch.float32
    linear, pool, adapters = make_setup(dtype, specs=[(8, False, False)])
    y, _ = check(backend, dtype, linear, pool, adapters, [0] * 6, ranks=5)
    x = make_x(6, linear.in_features, dtype)
    wrong = adapters[0]._replace(lora_A=adapters[0].lora_A[:4], lora_B=adapters[0].lora_B[:, :4])
    y_wrong = multi_lora_linear_ref(x, linear.weight, linear.bias, [0] * 6, [wrong], [None] * 6)
    assert rel_err(y, y_wrong) > 10 * TOL[dtype]


def test_gather_bmm_in_the_input_dtype():
    """The gather-bmm baseline in bf16/fp16 arithmetic (compute_dtype=x's dtype) is still the same op."""
    dtype = torch.float16
    linear, pool, adapters = make_setup(dtype)
    ids = adapter_mix("some-none", 12, len(ADAPTERS), seed=4)
    batch = AdapterBatch.build(pool, ids)
    x = make_x(12, 70, dtype)
    args = (x, linear.weight, linear.bias, pool.lora_A, pool.lora_B, pool.magnitude_scale, pool.dora_slots,
            batch.row_slot, batch.row_rank, batch.row_scale)  # fmt: skip
    y = multi_lora_forward(*args, compute_dtype=dtype)
    assert y.dtype == dtype
    assert rel_err(y, multi_lora_linear_ref(x, linear.weight, linear.bias, ids, adapters)) < TOL[dtype]


# ---- batch metadata ---------------------------------------------------------------------------------------------


def test_batch_layout_groups_rows_by_adapter():
    """Rows sorted by slot (stably), one tile per run of <= block_m rows; rows without adapter in no tile."""
    linear, pool, _ = make_setup(torch.float32)
    ids = [2, -1, 0, 2, 2, -1, 0, 4]
    ranks = [1, None, 8, 3, 2, None, 5, None]
    batch = AdapterBatch.build(pool, ids, ranks)
    assert batch.sorted_rows.tolist() == [2, 6, 0, 3, 4, 7, 1, 5]
    used = batch.tiles[: batch.num_tiles].tolist()
    assert used == [[0, 0, 2, 8], [2, 2, 5, 3], [4, 5, 6, 12]]  # (slot, start, end, max rank in the tile)
    assert (batch.tiles[batch.num_tiles :, 0] == -1).all()
    assert batch.tiles.shape[0] == max_tiles(8, pool.capacity)
    assert batch.row_scale[0].item() == pytest.approx(pool.slots[2].alpha / math.sqrt(1))  # a2 is rsLoRA
    assert batch.row_scale[2].item() == pytest.approx(pool.slots[0].alpha / 8)
    assert batch.row_scale[1].item() == 0.0 and batch.row_rank[1].item() == 0


def test_batch_tiles_split_long_segments():
    """A segment longer than block_m is cut into tiles; the tile bound holds for the worst case."""
    linear, pool, _ = make_setup(torch.float32)
    batch = AdapterBatch.build(pool, [1] * 40 + [0] * 3)
    assert batch.block_m == 16
    assert batch.tiles[: batch.num_tiles, :3].tolist() == [[0, 0, 3], [1, 3, 19], [1, 19, 35], [1, 35, 43]]
    for M in (1, 5, 17, 300, 1000):
        for n_adapters in (1, 3, 5):  # spread evenly, or each segment one row past a multiple of block_m (worst case)
            spread = [t % n_adapters for t in range(M)]
            bm = AdapterBatch.build(pool, spread).block_m
            ragged = [min(t // (bm + 1), n_adapters - 1) for t in range(M)]
            for ids in (spread, ragged):
                assert AdapterBatch.build(pool, ids).num_tiles <= max_tiles(M, pool.capacity)


def test_batch_accepts_names_none_and_tensors():
    linear, pool, _ = make_setup(torch.float32)
    by_name = AdapterBatch.build(pool, ["a2", None, "a0", -1])
    by_slot = AdapterBatch.build(pool, torch.tensor([2, -1, 0, -1], dtype=torch.int32), torch.tensor([3, 1, 8, 1]))
    assert torch.equal(by_name._packed, by_slot._packed)


def bad(case_id, kwargs, error, match):
    return pytest.param(kwargs, error, match, id=case_id)


BAD_BATCHES = [
    pytest.param(
        dict(adapter_ids=[0, 6]), ValueError, r"adapter_ids\[1\] = 6 is out of range \[-1, 6\)", id="id-too-big"
    ),
    bad("id-below--1", dict(adapter_ids=[-2]), ValueError, r"adapter_ids\[0\] = -2 is out of range"),
    bad("empty-slot", dict(adapter_ids=[0, 5]), ValueError, r"adapter_ids\[1\] = 5 names an empty slot"),
    bad("bad-name", dict(adapter_ids=["a0", "zz"]), KeyError, r"adapter_ids\[1\]: no adapter named 'zz'"),
    bad("float-id", dict(adapter_ids=[0, 1.0]), TypeError, r"adapter_ids\[1\] must be an int"),
    pytest.param(
        dict(adapter_ids=torch.tensor([0.0])), TypeError, r"adapter_ids must hold integers", id="float-tensor"
    ),
    pytest.param(
        dict(adapter_ids=torch.zeros(2, 2, dtype=torch.long)), ValueError, r"adapter_ids must be 1-D", id="2d"
    ),
    bad("scalar", dict(adapter_ids=7), TypeError, r"adapter_ids must be a sequence"),
    pytest.param(
        dict(adapter_ids=[0, 0], ranks=[8, 9]), ValueError, r"ranks\[1\] = 9 is outside \[1, 8\]", id="rank>r"
    ),
    bad("rank0", dict(adapter_ids=[0], ranks=[0]), ValueError, r"ranks\[0\] = 0 is outside"),
    pytest.param(
        dict(adapter_ids=[0, 1], ranks=[1]), ValueError, r"ranks must have one entry per adapter id", id="ranks-len"
    ),
    pytest.param(
        dict(adapter_ids=[1], ranks=[8]), ValueError, r"ranks\[0\] = 8 truncates the DoRA adapter", id="dora-trunc"
    ),
    bad("float-rank", dict(adapter_ids=[0], ranks=[2.5]), TypeError, r"ranks\[0\] must be an int"),
    pytest.param(
        dict(adapter_ids=[0, 1], seq_lens=[2]), ValueError, r"seq_lens must have one entry", id="seq-lens-len"
    ),
    pytest.param(
        dict(adapter_ids=[0], seq_lens=[-1]), ValueError, r"seq_lens\[0\] must be an int >= 0", id="seq-len<0"
    ),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_BATCHES)
def test_bad_batches_are_rejected_before_any_kernel(kwargs, error, match, monkeypatch):
    """Invalid ids and ranks raise while the metadata is built (naming the argument and entry), never read wild."""
    linear, pool, _ = make_setup(torch.float32)  # slot 5 of 6 is empty; slot 1 is DoRA (rank 16)
    # _layout is where rows are expanded and copied to the device: it must not be reached.
    monkeypatch.setattr(AdapterBatch, "_layout", lambda *a, **k: pytest.fail("layout before validation"))
    with pytest.raises(error, match=match):
        AdapterBatch.build(pool, **kwargs)


def test_batch_must_match_the_pool_and_the_input():
    linear, pool, _ = make_setup(torch.float32)
    batch = AdapterBatch.build(pool, [0, 1, -1])
    x = make_x(3, 70, torch.float32)
    with pytest.raises(ValueError, match="batch has 3 rows but x has 4"):
        multi_lora_linear(make_x(4, 70, torch.float32), linear.weight, linear.bias, pool, batch)
    with pytest.raises(TypeError, match="pool has dtype torch.float32 but x has torch.float16"):
        multi_lora_linear(x.half(), linear.weight.half(), linear.bias.half(), pool, batch)
    other = AdapterPool(70, 33, 6, MAX_RANK)
    with pytest.raises(ValueError, match="different pool state"):
        multi_lora_linear(x, linear.weight, linear.bias, other, batch)
    with pytest.raises(ValueError, match=r"pool is for a \[33, 70\] layer but weight is \[33, 69\]"):
        multi_lora_linear(x[:, :69], linear.weight[:, :69], linear.bias, pool, batch)
    pool.remove("a4")
    with pytest.raises(ValueError, match="different pool state"):
        multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    with pytest.raises(TypeError, match="pool must be an AdapterPool, got Linear"):
        multi_lora_linear(x, linear.weight, linear.bias, linear, batch)
    with pytest.raises(TypeError, match="batch must be an AdapterBatch .* got list"):
        multi_lora_linear(x, linear.weight, linear.bias, pool, [0, 1, -1])
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got list"):
        multi_lora_linear(x.tolist(), linear.weight, linear.bias, pool, AdapterBatch.build(pool, [0, 1, -1]))


@pytest.mark.parametrize("backend", kernel_backends())
def test_batch_copy_refills_in_place(backend):
    """copy_ swaps a batch's contents without new device tensors (what a captured CUDA graph needs)."""
    linear, pool, adapters = make_setup(torch.float32)
    batch = AdapterBatch.build(pool, [-1] * 8)
    views = [t.data_ptr() for t in (batch.row_slot, batch.row_rank, batch.row_scale, batch.sorted_rows, batch.tiles)]
    ids = [4, 0, 0, 2, -1, 1, 4, 3]
    batch.copy_(AdapterBatch.build(pool, ids, [3, 8, 2, None, None, None, 12, 1]))
    assert views == [t.data_ptr() for t in (batch.row_slot, batch.row_rank, batch.row_scale, batch.sorted_rows,
                                            batch.tiles)]  # fmt: skip
    x = make_x(8, 70, torch.float32)
    with use_backend(backend):
        y = multi_lora_linear(x, linear.weight, linear.bias, pool, batch)
    y_ref = multi_lora_linear_ref(x, linear.weight, linear.bias, ids, adapters, [3, 8, 2, None, None, None, 12, 1])
    assert rel_err(y, y_ref) < TOL[torch.float32]
    with pytest.raises(ValueError, match="copy_ needs the same layout"):
        batch.copy_(AdapterBatch.build(pool, ids[:7]))
    empty = AdapterBatch.build(pool, [-1] * 8)
    empty.captured_without_adapters = True  # what a CUDA-graph capture of a batch without adapter rows records
    empty.copy_(AdapterBatch.build(pool, [None] * 8))
    with pytest.raises(ValueError, match="captured in a CUDA graph while no row had an adapter"):
        empty.copy_(batch)


# ---- the pool ---------------------------------------------------------------------------------------------------


def test_pool_add_remove_reload_cycles():
    """Slots are reused without reallocating the pool; a reloaded adapter serves its new weights, stale ones none."""
    dtype = torch.float32
    linear = make_linear(dtype=dtype)
    pool = AdapterPool.for_linear(linear, 3, MAX_RANK)
    ptrs = (pool.lora_A.data_ptr(), pool.lora_B.data_ptr(), pool.magnitude_scale.data_ptr())
    for cycle in range(3):
        for i, r in enumerate((16, 4, 9)):
            A, B, m = random_adapter(70, 33, r, dora=i == 1, seed=10 * cycle + i)
            assert pool.add(f"c{i}", A, B, alpha=r, magnitude=m) == i
        assert len(pool) == 3 and pool.names == {"c0": 0, "c1": 1, "c2": 2}
        ids = [0, 1, 2, 1, -1]
        for backend in kernel_backends():
            check(backend, dtype, linear, pool, reference_adapters(pool), ids)
        pool.remove("c1")
        assert pool.slots[1] is None and "c1" not in pool
        assert torch.count_nonzero(pool.lora_A[1]) == 0 and torch.count_nonzero(pool.lora_B[1]) == 0
        A, B, _ = random_adapter(70, 33, 2, seed=99 + cycle)
        assert pool.add("small", A, B, alpha=1.0) == 1  # the freed slot, now rank 2: columns past 2 are zero
        assert torch.count_nonzero(pool.lora_A[1, 2:]) == 0
        check("torch", dtype, linear, pool, reference_adapters(pool), [1, 0, 2, 1])
        for name in list(pool.names):
            pool.remove(name)
    assert (pool.lora_A.data_ptr(), pool.lora_B.data_ptr(), pool.magnitude_scale.data_ptr()) == ptrs


def test_pool_takes_peft_shaped_adapters():
    """peft's modules (lora_A: nn.Linear(in, r), lora_B: nn.Linear(r, out)) or their .weight, float32 beside a
    float16 layer: cast on load, as peft's adapters usually are."""
    linear = make_linear(dtype=torch.float16)
    pool = AdapterPool.for_linear(linear, 2, 8)
    lora_A, lora_B = nn.Linear(70, 8, bias=False), nn.Linear(8, 33, bias=False)
    nn.init.normal_(lora_B.weight)
    pool.add("modules", lora_A, lora_B, alpha=16)
    pool.add("weights", lora_A.weight, lora_B.weight, alpha=16)
    assert pool.lora_A.dtype == torch.float16
    assert torch.equal(pool.lora_A[0, :8], lora_A.weight.detach().half().to(DEVICE))
    assert torch.equal(pool.lora_B[0], pool.lora_B[1])


BAD_ADDS = [
    pytest.param(
        dict(lora_A=torch.zeros(4, 69)), ValueError, r"lora_A must be \[r, in_features\] = \[r, 70\]", id="A-K"
    ),
    bad("A-transposed", dict(lora_A=torch.zeros(70, 4)), ValueError, r"transposed\?"),
    pytest.param(
        dict(lora_A=torch.zeros(17, 70), lora_B=torch.zeros(33, 17)), ValueError, r"rank 17, outside", id="rank>max"
    ),
    pytest.param(
        dict(lora_B=torch.zeros(33, 5)), ValueError, r"lora_B must be \[out_features, r\] = \[33, 4\]", id="B-r"
    ),
    bad("B-transposed", dict(lora_B=torch.zeros(4, 33)), ValueError, r"lora_B must be"),
    pytest.param(
        dict(lora_A=torch.zeros(4, 70, dtype=torch.int64)), TypeError, r"lora_A must be a floating", id="A-int"
    ),
    bad("B-list", dict(lora_B=[[0.0]]), TypeError, r"lora_B must be a torch.Tensor"),
    bad("alpha-nan", dict(alpha=float("nan")), ValueError, r"alpha must be a finite number"),
    pytest.param(
        dict(magnitude=torch.ones(32)), ValueError, r"magnitude must be \[out_features\] = \[33\]", id="m-shape"
    ),
    bad("duplicate", dict(name="a0"), ValueError, r"adapter 'a0' is already loaded \(slot 0\)"),
    bad("no-name", dict(name=""), TypeError, r"name must be a non-empty str"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_ADDS)
def test_pool_add_errors_name_the_argument(kwargs, error, match):
    linear = make_linear()
    pool = AdapterPool.for_linear(linear, 3, MAX_RANK)
    pool.add("a0", torch.zeros(2, 70), torch.zeros(33, 2), alpha=1)
    args = dict(name="new", lora_A=torch.zeros(4, 70), lora_B=torch.zeros(33, 4), alpha=8.0) | kwargs
    with pytest.raises(error, match=match):
        pool.add(**args)
    assert pool.names == {"a0": 0}  # nothing was loaded


def test_pool_capacity_and_unknown_names():
    pool = AdapterPool(8, 4, 2, 2)
    pool.add("x", torch.ones(1, 8), torch.ones(4, 1), alpha=1)
    pool.add("y", torch.ones(1, 8), torch.ones(4, 1), alpha=1)
    with pytest.raises(RuntimeError, match=r"AdapterPool is full: all 2 slots are taken \(\['x', 'y'\]\)"):
        pool.add("z", torch.ones(1, 8), torch.ones(4, 1), alpha=1)
    with pytest.raises(KeyError, match=r"no adapter named 'z' in this pool; loaded: \['x', 'y'\]"):
        pool.remove("z")
    with pytest.raises(ValueError, match="magnitude \\(DoRA\\) needs the pool's base_weight"):
        AdapterPool(8, 4, 2, 2).add("d", torch.ones(1, 8), torch.ones(4, 1), alpha=1, magnitude=torch.ones(4))
    for kwargs, match in [(dict(capacity=0), "capacity"), (dict(max_rank=0), "max_rank"), (dict(in_features=0),
                          "in_features"), (dict(base_weight=torch.zeros(8, 4)), "base_weight must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            AdapterPool(**(dict(in_features=8, out_features=4, capacity=2, max_rank=2) | kwargs))


def test_dora_norm_is_factored_and_matches_the_direct_norm():
    """g_i = m_i / ||W0 + s B A||_row computed at load time, factored (chunked over rows), equal to the direct norm."""
    W0, A, B = torch.randn(50, 37, dtype=torch.float64), torch.randn(6, 37, dtype=torch.float64), torch.randn(50, 6)
    direct = torch.linalg.vector_norm(W0 + 0.7 * (B.double() @ A), dim=1)
    torch.testing.assert_close(
        row_norm(W0, A, B, None, scale=0.7, rank=6, chunk_rows=16), direct, rtol=1e-12, atol=1e-12
    )
    linear = make_linear(37, 50, torch.float64)
    pool = AdapterPool.for_linear(linear, 2, 8)
    m = torch.rand(50, dtype=torch.float64) + 0.5
    pool.add("d", A, B, alpha=4.2, magnitude=m)  # scale alpha / r = 0.7
    direct = torch.linalg.vector_norm(linear.weight.detach().cpu() + 0.7 * (B.double() @ A), dim=1)
    torch.testing.assert_close(pool.magnitude_scale[0].cpu(), m / direct, rtol=1e-12, atol=0)
    assert pool.magnitude_scale.dtype == torch.float64 and (pool.magnitude_scale[1] == 1).all()  # float32 below fp64
    assert pool.dora_slots.tolist() == [1, 0]


# ---- the module and the model-level batch -----------------------------------------------------------------------


def test_module_wraps_linear_and_serves_ids():
    linear = make_linear()
    layer = MultiLoRALinear.from_linear(linear, 4, MAX_RANK)
    assert layer.weight is linear.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = make_x(5, 70, torch.float32)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)  # no ids, no serve_batch: the base layer
    for i, (r, dora, rslora) in enumerate(ADAPTERS[:3]):
        A, B, m = random_adapter(70, 33, r, dora=dora, seed=i)
        layer.add_adapter(f"a{i}", A, B, alpha=r, magnitude=m, rslora=rslora)
    y = layer(x, ["a2", None, "a0", "a1", "a2"], [1, None, None, None, 2])
    y_ref = multi_lora_linear_ref(x, linear.weight, linear.bias, [2, -1, 0, 1, 2], reference_adapters(layer.pool),
                                  [1, None, None, None, 2])  # fmt: skip
    assert rel_err(y, y_ref) < TOL[torch.float32]
    batch = AdapterBatch.build(layer.pool, [2, -1, 0, 1, 2], [1, 1, 8, 16, 2])
    torch.testing.assert_close(layer(x, batch), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapter_ids has 3 entries but x"):
        layer(x, [0, 1, 2])
    assert "capacity=4" in repr(layer) and "'a0'" in repr(layer)


def test_module_to_moves_the_pool_and_keeps_g_in_float32():
    layer = MultiLoRALinear(16, 8, capacity=2, max_rank=4, device=DEVICE)
    A, B, m = random_adapter(16, 8, 4, dora=True)
    layer.add_adapter("d", A, B, alpha=8, magnitude=m)
    g = layer.pool.magnitude_scale.clone()
    layer.to(torch.float16)
    assert layer.pool.lora_A.dtype == torch.float16 and layer.weight.dtype == torch.float16
    assert layer.pool.magnitude_scale.dtype == torch.float32 and torch.equal(layer.pool.magnitude_scale, g)
    assert layer.pool.base_weight is layer.weight


class TwoLayer(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = MultiLoRALinear.from_linear(make_linear(24, 40, dtype, seed=1), 4, 8)
        self.down = MultiLoRALinear.from_linear(make_linear(40, 24, dtype, bias=False, seed=2), 4, 8)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def load_both(model, name, r, seed, dora=False):
    for layer in (model.up, model.down):
        A, B, m = random_adapter(layer.in_features, layer.out_features, r, dora=dora, seed=seed)
        layer.add_adapter(name, A, B, alpha=2 * r, magnitude=m)


@pytest.mark.parametrize("backend", kernel_backends())
def test_serve_batch_sets_ids_for_every_layer_and_builds_once(backend, monkeypatch):
    model = TwoLayer()
    load_both(model, "p", 8, 0)
    load_both(model, "q", 3, 1, dora=True)
    ids, ranks = ["q", "p", None, "p"], [None, 2, None, 8]
    x = make_x(4, 24, torch.float32)
    builds = []
    build = AdapterBatch.build.__func__
    monkeypatch.setattr(
        AdapterBatch, "build", classmethod(lambda cls, *a, **k: builds.append(1) or build(cls, *a, **k))
    )
    with use_backend(backend), serve_batch(model, ids, ranks) as state:
        y = model(x)
        y_again = model(x)
    assert len(builds) == 1 and len(state.batches) == 1  # both pools hold (8, 3)-rank adapters alike: one batch
    slots = [1, 0, -1, 0]
    h = torch.tanh(multi_lora_linear_ref(x, model.up.weight, model.up.bias, slots, reference_adapters(model.up.pool),
                                         ranks))  # fmt: skip
    y_ref = multi_lora_linear_ref(h, model.down.weight, None, slots, reference_adapters(model.down.pool), ranks)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert torch.equal(y, y_again)
    assert model.up._serving is None  # restored on exit
    base = nn.functional.linear(torch.tanh(nn.functional.linear(x, model.up.weight, model.up.bias)), model.down.weight)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)  # outside the block: the base layers alone


@pytest.mark.parametrize("backend", kernel_backends())
def test_serve_batch_prefill_and_update(backend):
    """3-D prefill through a model with per-sequence ids; update_ refills the built batch in place."""
    model = TwoLayer()
    load_both(model, "p", 8, 0)
    load_both(model, "q", 5, 1)
    x = make_x(0, 24, torch.float32, lead=(3, 4))
    with use_backend(backend), serve_batch(model, ["p", None, "q"]) as state:
        y1 = model(x)
        (batch,) = state.batches
        state.update_(["q", "q", None])
        (same,) = state.batches
        y2 = model(x)
        with pytest.raises(ValueError, match="as many adapter_ids"):
            state.update_(["q"])
    assert same is batch and batch.num_rows == 12
    for y, ids in ((y1, ["p", None, "q"]), (y2, ["q", "q", None])):
        with use_backend(backend):
            expected = model.down(torch.tanh(model.up(x, ids)), ids)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_serve_batch_needs_multi_lora_layers():
    with pytest.raises(ValueError, match="contains no MultiLoRALinear"):
        with serve_batch(nn.Linear(3, 3), [0]):
            pass


# ---- torch.library registration ---------------------------------------------------------------------------------


def _op_args(dtype=torch.float32):
    linear, pool, _ = make_setup(dtype, K=12, N=7, specs=[(4, False, False), (2, True, False)], capacity=3)
    batch = AdapterBatch.build(pool, [1, 0, -1, 1, 0], [None, 3, None, None, 1])
    x = make_x(5, 12, dtype)
    return (x, linear.weight, linear.bias, pool.lora_A, pool.lora_B, pool.magnitude_scale, pool.dora_slots,
            batch.row_slot, batch.row_rank, batch.row_scale, batch.sorted_rows, batch.tiles, batch.slot_rows,
            batch.block_m, batch.has_adapter, batch.has_dora, 0.0, None, False,
            False), (linear, pool, batch)  # fmt: skip


def test_opcheck_multi_lora_fwd():
    args, _ = _op_args()
    torch.library.opcheck(torch.ops.lowrank_kernels.multi_lora_fwd.default, args)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces multi_lora_linear (the op, with a prebuilt batch) without graph breaks."""
    (x, *_), (linear, pool, batch) = _op_args()

    def fn(x):
        return multi_lora_linear(x, linear.weight, linear.bias, pool, batch) * 2

    torch._dynamo.reset()
    y = torch.compile(fn, fullgraph=True)(x)
    torch.testing.assert_close(y, fn(x), rtol=1e-5, atol=1e-5)


# ---- GPU: realistic sizes in bf16, CUDA graphs (run by scripts/gpu_run.sh on the lent device) ---------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "M, K, N, n, r, mix",
    [
        pytest.param(1, 4096, 4096, 8, 16, "identical", id="M1-4096x4096-n8-r16"),
        pytest.param(64, 4096, 4096, 32, 16, "distinct", id="M64-4096x4096-n32-r16-distinct"),
        pytest.param(64, 4096, 11008, 32, 64, "zipf", id="M64-4096x11008-n32-r64-zipf"),
        pytest.param(512, 4096, 4096, 128, 16, "uniform", id="M512-4096x4096-n128-r16-uniform"),
        pytest.param(2049, 11008, 4096, 8, 64, "some-none", id="M2049-11008x4096-n8-r64-some-none"),
    ],
)
def test_gpu_realistic(dtype, M, K, N, n, r, mix, poison_empty):
    linear = make_linear(K, N, dtype)
    pool = AdapterPool.for_linear(linear, n, r)
    specs = [(r if i % 3 else max(1, r // 2), i % 5 == 1, i % 7 == 2) for i in range(n)]
    adapters = fill_pool(pool, specs)
    check("triton", dtype, linear, pool, adapters, adapter_mix(mix, M, n, seed=M))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_replays_new_batches():
    """Capture a model's decode step once; replay it for other batches copied in (one without adapters too, and after
    an adapter is swapped into a pool slot): every replay matches eager execution. A graph captured on a batch without
    adapter rows holds no adapter launch and refuses batches that need one."""
    model = TwoLayer(torch.bfloat16)
    for i, (r, dora) in enumerate([(8, False), (4, True), (2, False)]):
        load_both(model, f"a{i}", r, i, dora=dora)
    x = make_x(16, 24, torch.bfloat16)

    def capture(state):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)  # builds the batch and compiles the kernels before capture (a capture cannot copy from the host)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = model(x)
        return graph, y_static

    with use_backend("triton"), serve_batch(model, adapter_mix("none", 16, 3)) as state:
        graph, y_static = capture(state)  # no adapter row: no adapter launch recorded, so adapter rows are refused
        graph.replay()
        assert rel_err(y_static, model(x)) < TOL[torch.bfloat16]
        with pytest.raises(ValueError, match="captured in a CUDA graph while no row had an adapter"):
            state.update_(adapter_mix("distinct", 16, 3))
    with use_backend("triton"), serve_batch(model, adapter_mix("distinct", 16, 3)) as state:
        graph, y_static = capture(state)
        for mix in ("distinct", "zipf", "some-none", "none"):
            ids = adapter_mix(mix, 16, 3, seed=7)
            state.update_(ids)
            graph.replay()
            with serve_batch(model, ids):  # eager, a fresh batch: a stale or ignored batch would be ~100% off
                assert rel_err(y_static, model(x)) < TOL[torch.bfloat16]
        for layer in (model.up, model.down):  # swap an adapter into slot 0 between replays: no reallocation
            layer.remove_adapter("a0")
        load_both(model, "a3", 8, 3)
        ids = [0, 1, 2, -1] * 4
        state.update_(ids)
        graph.replay()
        with serve_batch(model, ids):
            assert rel_err(y_static, model(x)) < TOL[torch.bfloat16]
