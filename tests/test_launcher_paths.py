"""Every code path of the Triton launchers runs under the interpreter, and is checked against the float64 oracle.

The real thresholds need big shapes (split-M reductions above 256 rows a split, cuBLAS above 64 rows), so tests
lower them; each case also asserts that the path it is about really ran (the kernels' launches are recorded), so a
change of threshold cannot make a test silently exercise something else.
"""

import collections

import pytest
import torch
from helpers import HAS_TRITON, REL_TOL, make_lora_inputs, oracle, rel_err

from lowrank_kernels import dora_linear, lora_linear, use_backend
from lowrank_kernels.ops.dora.naive import dora_linear_ref
from lowrank_kernels.ops.lora.naive import dropout_mask

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed")


class Launches:
    """Records each launch of the named kernels of a Triton module: kernel name -> [(grid, constexpr flags)]."""

    def __init__(self, monkeypatch, module, names):
        self.calls = collections.defaultdict(list)
        for name in names:
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, self._recording(name, kernel))

    def _recording(self, name, kernel):
        calls = self.calls

        class Recording:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls[name].append((grid, {k: v for k, v in kwargs.items() if k.isupper()}))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Recording()


def lora_case(M, K, N, R, b, *, dropout=0.0, frozen=False, rank_scale=False, seed=0):
    x, weight, bias, A, B, v = make_lora_inputs(M, K, N, R, torch.float32, rank_scale=rank_scale, seed=seed)
    params = [t.requires_grad_() for t in (x, A, B) + ((v,) if v is not None else ())]
    with use_backend("triton"):
        y = lora_linear(x, weight, bias, A, B, scale=0.6, rank=b, rank_scale=v, dropout=dropout, frozen=frozen,
                        seed=21)  # fmt: skip
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    mask = dropout_mask(21, (M, K), dropout, x.device) if dropout else None
    y_ref, grads_ref = oracle(x, weight, bias, A, B, v, scale=0.6, rank=b, mask=mask,
                              grad_rank_start=b - 1 if frozen else 0, grad_out=grad_out)  # fmt: skip
    assert rel_err(y, y_ref) < REL_TOL[torch.float32]
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < REL_TOL[torch.float32]


@pytest.fixture
def lora_kernels(monkeypatch):
    from lowrank_kernels.ops.lora import triton

    return triton, Launches(monkeypatch, triton, ["lora_shrink_kernel", "lora_matmul_kernel", "lora_weight_grad_kernel",
                                                  "lowrank_epilogue_kernel"])  # fmt: skip


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["plain", "dropout"])
@pytest.mark.parametrize("rank_scale", [False, True], ids=["lora", "rank-scale"])
def test_weight_grad_split_m_sums_every_split(lora_kernels, monkeypatch, dropout, rank_scale):
    """Several row splits of the deterministic split-M weight gradient (dA, dB), with and without dropout."""
    triton, launches = lora_kernels
    monkeypatch.setattr(triton, "WEIGHT_GRAD_MIN_ROWS", 16)
    lora_case(150, 40, 24, 8, 6, dropout=dropout, rank_scale=rank_scale)
    grids = [grid for grid, _ in launches.calls["lora_weight_grad_kernel"]]
    assert len(grids) == 2 and all(grid[2] >= 3 for grid in grids), grids


@pytest.mark.parametrize("strategy", ["cublas", "triton"])
def test_prefill_strategies(lora_kernels, monkeypatch, strategy):
    """Above the decode bound: cuBLAS + in-place addmm, or our GEMM with the low-rank epilogue (env-selected)."""
    triton, launches = lora_kernels
    monkeypatch.setenv(triton.GEMM_ENV_VAR, strategy)
    lora_case(70, 40, 24, 8, 5, dropout=0.0)
    matmuls = launches.calls["lora_matmul_kernel"]
    if strategy == "cublas":
        assert matmuls == []  # forward y and backward dx both went to cuBLAS
    else:
        assert len(matmuls) == 2 and not any(flags["FUSE_SHRINK"] for _, flags in matmuls)


def test_decode_is_one_fused_launch_at_every_rank_block(lora_kernels):
    """M <= 64 and R <= FUSED_SHRINK_MAX_RANK: the forward is one launch (shrink fused); R = 100 spans two 64-rank
    blocks of the unfused kernels, and a rank past the bound falls back to the primitives."""
    triton, launches = lora_kernels
    lora_case(7, 40, 24, 100, 70)
    fused = [flags for _, flags in launches.calls["lora_matmul_kernel"] if flags["FUSE_SHRINK"]]
    assert len(fused) == 1 and fused[0]["BLOCK_R"] == 128
    launches.calls.clear()
    lora_case(7, 40, 24, triton.FUSED_SHRINK_MAX_RANK + 32, 9)
    assert not any(flags["FUSE_SHRINK"] for _, flags in launches.calls["lora_matmul_kernel"])
    assert launches.calls["lora_shrink_kernel"]


def test_rank_blocks_past_the_active_rank_write_zeros(lora_kernels, poison_empty):
    """R = 160 (three 64-rank blocks) at b = 10: the blocks past b skip their K loop and must still write xa's zeros
    (poisoned allocations would leak NaN into dB otherwise)."""
    _, launches = lora_kernels
    lora_case(70, 40, 24, 160, 10, frozen=True)
    assert any(grid[1] == 3 for grid, _ in launches.calls["lora_shrink_kernel"])


@pytest.fixture
def dora_kernels(monkeypatch):
    from lowrank_kernels.ops.dora import triton

    return triton, Launches(monkeypatch, triton, ["col_dot_kernel", "dora_dx_kernel", "dora_dropout_shrink_kernel"])


def dora_case(M, K, N, R, *, dropout=0.0):
    x, weight, bias, A, B, _ = make_lora_inputs(M, K, N, R, torch.float32)
    m = torch.rand(N, dtype=torch.float32) + 0.5
    params = [t.requires_grad_() for t in (x, A, B, m)]
    with use_backend("triton"):
        y = dora_linear(x, weight, bias, A, B, m, scale=0.6, dropout=dropout, seed=4)
        grad_out = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, grad_out)
    ref_params = [t.detach().double().requires_grad_() for t in params]
    mask = dropout_mask(4, (M, K), dropout, x.device).double() if dropout else None
    y_ref = dora_linear_ref(ref_params[0], weight.double(), bias.double(), ref_params[1], ref_params[2], ref_params[3],
                            0.6, None, mask)  # fmt: skip
    grads_ref = torch.autograd.grad(y_ref, ref_params, grad_out.double())
    assert rel_err(y, y_ref) < REL_TOL[torch.float32]
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < REL_TOL[torch.float32]


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["plain", "dropout"])
def test_dora_magnitude_grad_split_m(dora_kernels, monkeypatch, dropout):
    """The split-M column reduction of dm (never run before): several splits, each summed."""
    triton, launches = dora_kernels
    row_splits = triton.row_splits
    monkeypatch.setattr(
        triton, "row_splits", lambda M, tiles, block_m, **kw: row_splits(M, tiles, block_m, min_rows=32)
    )
    dora_case(150, 40, 24, 6, dropout=dropout)
    ((grid, _),) = launches.calls["col_dot_kernel"]
    assert grid[1] >= 3, grid
    assert launches.calls["dora_dx_kernel"] and bool(launches.calls["dora_dropout_shrink_kernel"]) == (dropout > 0)


@pytest.mark.parametrize("M", [7, 70], ids=["decode-fused", "prefill-cublas-epilogue"])
def test_dora_forward_strategies(M, monkeypatch):
    """DoRA without dropout: the fused decode launch with g in its epilogue, or cuBLAS + the in-place epilogue."""
    from lowrank_kernels.ops.lora import triton

    launches = Launches(monkeypatch, triton, ["lora_matmul_kernel", "lowrank_epilogue_kernel"])
    dora_case(M, 40, 24, 6)
    if M <= triton.FUSED_SHRINK_MAX_M:
        assert [flags["FUSE_SHRINK"] and flags["STORE_Z"] for _, flags in launches.calls["lora_matmul_kernel"]][0]
    else:
        assert [flags["STORE_Z"] for _, flags in launches.calls["lowrank_epilogue_kernel"]] == [True]
