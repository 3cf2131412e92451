"""Each kernel backend's primitives against their naive twins (same name, same arguments, same returns).

The ops are written once over these primitives (``ops/<op>/op.py``), so a backend is right when every primitive
is: here each one runs on its own, with every option, in float32 against the naive primitive in float64 — the
parts of a result the ops never read (``xa`` past the active rank) included. Triton runs under the interpreter on a
CPU; on a GPU with the extension built, the CUDA C++ backend runs the same cases.
"""

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, HAS_TRITON, REL_TOL, rel_err

from lowrank_kernels.backend import availability
from lowrank_kernels.ops.dora import naive as dora_naive
from lowrank_kernels.ops.dora.op import implementation as dora_implementation
from lowrank_kernels.ops.lora import naive
from lowrank_kernels.ops.lora.op import implementation

BACKENDS = (["triton"] if HAS_TRITON else []) + (["cuda"] if HAS_CUDA and availability("cuda", "cuda") is None else [])
TOL = REL_TOL[torch.float32]


def rnd(*shape, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(DEVICE)


def close(actual, expected):
    """float32 result within float32's tolerance of the float64 naive result."""
    assert actual.shape == expected.shape and actual.dtype != torch.float64
    assert rel_err(actual, expected) < TOL


@pytest.fixture(params=BACKENDS)
def impl(request):
    return implementation(request.param)


@pytest.mark.parametrize("M, K, R, rank", [(5, 40, 8, 8), (70, 40, 100, 37), (3, 24, 160, 10)])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_shrink(impl, M, K, R, rank, p_drop):
    x, a = rnd(M, K), rnd(R, K, std=K**-0.5)
    t = impl.shrink(x.float(), a.float(), rank, p_drop=p_drop, seed=9)
    expected = naive.shrink(x, a, rank, p_drop=p_drop, seed=9)
    assert t.dtype == torch.float32 and (t[:, rank:] == 0).all()  # zero past the active rank, every rank block
    close(t, expected)


OPTIONS = {
    "plain": {},
    "rank-scale": dict(v=True),
    "epilogue-dropout": dict(epilogue_dropout=True),
    "col-scale": dict(col_scale=True, save_z=True),
    "col-scale-no-z": dict(col_scale=True),
    "dropped-x": dict(col_scale=True, dropped_x=True, save_z=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("M", [5, 70], ids=["decode", "prefill"])
def test_lowrank_matmul(impl, option, M):
    opts = OPTIONS[option]
    K, N, R, rank, p = 40, 24, 12, 7, 0.25
    x, w, bias, t, u = rnd(M, K), rnd(N, K, std=K**-0.5), rnd(N), rnd(M, R), rnd(N, R, std=R**-0.5)
    v = rnd(R) if opts.get("v") else None
    col_scale = (rnd(N).abs() + 0.5, rnd(N).abs() + 1.0) if opts.get("col_scale") else None
    keep = naive.dropout_mask(3, (M, K), p, DEVICE) != 0
    dropped = torch.where(keep, x, 0.0) if opts.get("dropped_x") else None
    kw = dict(scale=0.8, rank=rank, p_drop=p, seed=3, epilogue_dropout=opts.get("epilogue_dropout", False),
              save_z=opts.get("save_z", False))  # fmt: skip

    def f32(a):
        return None if a is None else a.float()

    y, z = impl.lowrank_matmul(x.float(), w.float(), bias.float(), t.float(), u.float(), f32(v), **kw,
                               col_scale=None if col_scale is None else tuple(map(f32, col_scale)),
                               dropped_x=f32(dropped))  # fmt: skip
    y_ref, z_ref = naive.lowrank_matmul(x, w, bias, t, u, v, **kw, col_scale=col_scale, dropped_x=dropped)
    close(y, y_ref)
    assert (z is None) == (z_ref is None)
    if z is not None:
        close(z, z_ref)


@pytest.mark.parametrize("M", [5, 70], ids=["decode", "prefill"])
@pytest.mark.parametrize("col_scale", [False, True], ids=["lora", "dora"])
def test_fused_forward_equals_the_primitives(impl, M, col_scale):
    fused = getattr(impl, "fused_forward", None)
    if fused is None:
        pytest.skip("this backend has no fused override")
    K, N, R, rank = 40, 24, 12, 7
    x, w, bias, a, b = rnd(M, K), rnd(N, K, std=K**-0.5), rnd(N), rnd(R, K, std=K**-0.5), rnd(N, R)
    cs = (rnd(N).abs() + 0.5, rnd(N).abs() + 1.0) if col_scale else None
    out = fused(x.float(), w.float(), bias.float(), a.float(), b.float(), None, scale=0.8, rank=rank, p_drop=0.0,
                seed=0, col_scale=None if cs is None else (cs[0].float(), cs[1].float()), save_z=col_scale)  # fmt: skip
    if out is None:
        assert M > 64  # declines only outside decode sizes
        return
    y, xa, z = out
    xa_ref = naive.shrink(x, a, rank)
    y_ref, z_ref = naive.lowrank_matmul(x, w, bias, xa_ref, b, None, scale=0.8, rank=rank, col_scale=cs,
                                        save_z=col_scale)  # fmt: skip
    close(xa, xa_ref)
    close(y, y_ref)
    if col_scale:
        close(z, z_ref)


@pytest.mark.parametrize("M, rank_start, rank", [(70, 0, 9), (600, 3, 9), (5, 8, 9)])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("with_v", [False, True], ids=["lora", "rank-scale"])
def test_weight_grad(impl, M, rank_start, rank, p_drop, with_v):
    K, R = 40, 12
    t, x = rnd(M, R), rnd(M, K)
    v = rnd(R) if with_v else None
    kw = dict(scale=0.8, rank_start=rank_start, rank=rank, p_drop=p_drop, seed=5)
    out = impl.weight_grad(t.float(), x.float(), None if v is None else v.float(), **kw)
    close(out, naive.weight_grad(t, x, v, **kw))


@pytest.fixture(params=BACKENDS)
def dora_impl(request):
    return dora_implementation(request.param)


@pytest.mark.parametrize("cached", [False, True], ids=["w0sq-computed", "w0sq-cached"])
@pytest.mark.parametrize("R, rank", [(8, 8), (160, 150)])
def test_row_norm(dora_impl, cached, R, rank):
    N, K = 70, 40
    w, a, b = rnd(N, K, std=K**-0.5), rnd(R, K, std=K**-0.5), rnd(N, R, std=R**-0.5)
    w0sq = w.square().sum(1) if cached else None
    out = dora_impl.row_norm(w.float(), a.float(), b.float(), None if w0sq is None else w0sq.float(), scale=0.6,
                             rank=rank)  # fmt: skip
    close(out, dora_naive.row_norm(w, a, b, w0sq, scale=0.6, rank=rank))


def test_dropout_shrink(dora_impl):
    x, a = rnd(20, 40), rnd(8, 40)
    xd, t = dora_impl.dropout_shrink(x.float(), a.float(), 5, p_drop=0.3, seed=2)
    xd_ref, t_ref = dora_naive.dropout_shrink(x, a, 5, p_drop=0.3, seed=2)
    assert torch.equal(xd, xd_ref.float())  # x with its dropped entries zeroed: exact
    close(t, t_ref)


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
@pytest.mark.parametrize("M", [5, 70], ids=["decode", "prefill"])
def test_dora_dx(dora_impl, p_drop, M):
    N, K, R, rank = 24, 40, 12, 7
    dy, w, g, t, a = rnd(M, N), rnd(N, K), rnd(N).abs() + 0.5, rnd(M, R), rnd(R, K)
    kw = dict(scale=0.8, rank=rank, p_drop=p_drop, seed=4)
    out = dora_impl.dora_dx(dy.float(), w.float(), g.float(), t.float(), a.float(), **kw)
    close(out, dora_naive.dora_dx(dy, w, g, t, a, **kw))


@pytest.mark.parametrize("M", [5, 700])
def test_col_dot(dora_impl, M):
    p, q = rnd(M, 150), rnd(M, 150, seed=1)
    close(dora_impl.col_dot(p.float(), q.float()), dora_naive.col_dot(p, q))
