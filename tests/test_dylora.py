"""DyLoRA helpers: RankSampler and set_model_rank (CPU, reference backend)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch import nn

from lowrank_kernels.modules.lora import LoRALinear
from lowrank_kernels.training.dylora import RankSampler, set_model_rank

# ---------------------------------------------------------------------------------------------- RankSampler


@pytest.mark.parametrize("distribution", ["uniform", "geometric"])
def test_sampler_deterministic_with_seed(distribution):
    s1, s2 = RankSampler(1, 16, distribution, seed=123), RankSampler(1, 16, distribution, seed=123)
    seq1 = [s1.sample() for _ in range(200)]
    seq2 = [s2.sample() for _ in range(200)]
    assert seq1 == seq2
    s3 = RankSampler(1, 16, distribution, seed=124)
    assert [s3.sample() for _ in range(200)] != seq1


def test_sampler_independent_of_global_rng():
    s1 = RankSampler(2, 9, seed=7)
    seq1 = [s1.sample() for _ in range(50)]
    random.seed(0)
    torch.manual_seed(0)
    s2 = RankSampler(2, 9, seed=7)
    seq2 = []
    for _ in range(50):
        random.random()  # disturbing the global RNGs changes nothing
        torch.rand(1)
        seq2.append(s2.sample())
    assert seq1 == seq2


@pytest.mark.parametrize("distribution", ["uniform", "geometric"])
@pytest.mark.parametrize(("r_min", "r_max"), [(1, 8), (3, 5), (4, 4), (2, 64)])
def test_sampler_range(distribution, r_min, r_max):
    s = RankSampler(r_min, r_max, distribution, geometric_p=0.3, seed=0)
    draws = [s.sample() for _ in range(2000)]
    assert all(isinstance(b, int) for b in draws)
    assert min(draws) >= r_min and max(draws) <= r_max
    if r_max - r_min <= 8:
        assert set(draws) == set(range(r_min, r_max + 1))  # every rank shows up


def test_uniform_is_flat():
    s = RankSampler(1, 8, "uniform", seed=1)
    n = 40_000
    counts = Counter(s.sample() for _ in range(n))
    for b in range(1, 9):
        assert abs(counts[b] / n - 1 / 8) < 0.01, (b, counts[b])
    assert s.probabilities() == pytest.approx({b: 1 / 8 for b in range(1, 9)})


def test_geometric_favours_small_ranks():
    p = 0.15
    s = RankSampler(1, 8, "geometric", geometric_p=p, seed=2)
    probs = s.probabilities()
    assert sum(probs.values()) == pytest.approx(1.0)
    # truncated geometric: consecutive ratio (1 - p), normalised over the range
    for b in range(1, 8):
        assert probs[b + 1] / probs[b] == pytest.approx(1 - p)
    n = 40_000
    counts = Counter(s.sample() for _ in range(n))
    for b in range(1, 9):
        assert abs(counts[b] / n - probs[b]) < 0.01, (b, counts[b] / n, probs[b])
    assert counts[1] > counts[4] > counts[8]
    # r_min shifts the support, not the shape
    s2 = RankSampler(5, 12, "geometric", geometric_p=p)
    assert list(s2.probabilities().values()) == pytest.approx(list(probs.values()))


def test_geometric_p_one_is_always_r_min():
    s = RankSampler(3, 10, "geometric", geometric_p=1.0, seed=0)
    assert {s.sample() for _ in range(100)} == {3}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"r_min": 0, "r_max": 8}, "r_min"),
        ({"r_min": -1, "r_max": 8}, "r_min"),
        ({"r_min": 1.5, "r_max": 8}, "r_min"),
        ({"r_min": True, "r_max": 8}, "r_min"),
        ({"r_min": 4, "r_max": 3}, "r_max"),
        ({"r_min": 1, "r_max": 8.0}, "r_max"),
        ({"r_min": 1, "r_max": 8, "distribution": "normal"}, "distribution"),
        ({"r_min": 1, "r_max": 8, "distribution": "geometric", "geometric_p": 0.0}, "geometric_p"),
        ({"r_min": 1, "r_max": 8, "distribution": "geometric", "geometric_p": 1.5}, "geometric_p"),
        ({"r_min": 1, "r_max": 8, "distribution": "geometric", "geometric_p": -0.1}, "geometric_p"),
        ({"r_min": 1, "r_max": 8, "geometric_p": "0.1"}, "geometric_p"),
        ({"r_min": 1, "r_max": 8, "seed": 1.0}, "seed"),
        ({"r_min": 1, "r_max": 8, "seed": "x"}, "seed"),
    ],
)
def test_sampler_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RankSampler(**kwargs)


# ------------------------------------------------------------------------------------------- set_model_rank


def _model(r1=8, r2=4):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 8)))
    m[0] = LoRALinear.from_linear(m[0], r=r1)
    m[2][0] = LoRALinear.from_linear(m[2][0], r=r2)
    return m


def _layers(m):
    return [x for x in m.modules() if isinstance(x, LoRALinear)]


def test_set_model_rank_applies_to_all_layers():
    m = _model(8, 8)
    assert set_model_rank(m, 3) == 2
    for layer in _layers(m):
        assert layer.active_rank == 3
        assert layer.frozen is False
        assert layer.scaling == pytest.approx(layer.lora_alpha / 3)
    assert set_model_rank(m, 5, frozen=True) == 2
    assert all(layer.active_rank == 5 and layer.frozen is True for layer in _layers(m))
    assert set_model_rank(m, 8) == 2
    assert all(layer.active_rank == 8 and layer.frozen is False for layer in _layers(m))


def test_set_model_rank_on_a_bare_layer():
    layer = LoRALinear.from_linear(nn.Linear(4, 4), r=2)
    assert set_model_rank(layer, 1) == 1
    assert layer.active_rank == 1


def test_set_model_rank_changes_the_output():
    m = _model(8, 8)
    with torch.no_grad():
        for layer in _layers(m):
            layer.lora_B.weight.normal_()
    x = torch.randn(5, 16)
    set_model_rank(m, 8)
    y8 = m(x)
    set_model_rank(m, 2)
    y2 = m(x)
    assert not torch.allclose(y8, y2)
    set_model_rank(m, 8)
    torch.testing.assert_close(m(x), y8)


def test_set_model_rank_no_lora_layer():
    with pytest.raises(ValueError, match="no LoRALinear"):
        set_model_rank(nn.Sequential(nn.Linear(4, 4)), 1)


def test_set_model_rank_rank_too_large_names_layer_and_changes_nothing():
    m = _model(8, 4)
    set_model_rank(m, 2)
    with pytest.raises(ValueError, match=r"2\.0") as exc:
        set_model_rank(m, 6)
    assert "r=4" in str(exc.value)
    assert all(layer.active_rank == 2 for layer in _layers(m))  # all-or-nothing


@pytest.mark.parametrize("b", [0, -1, 2.0, True])
def test_set_model_rank_bad_b(b):
    with pytest.raises(ValueError, match="b"):
        set_model_rank(_model(), b)


def test_sampler_apply():
    m = _model(8, 8)
    s = RankSampler(1, 8, seed=5)
    ref = RankSampler(1, 8, seed=5)
    for _ in range(20):
        b = s.apply(m)
        assert b == ref.sample()
        assert all(layer.active_rank == b and not layer.frozen for layer in _layers(m))
    b = s.apply(m, frozen=True)
    assert all(layer.active_rank == b and layer.frozen for layer in _layers(m))


def test_sampler_apply_rank_beyond_a_layer_raises():
    m = _model(8, 4)
    s = RankSampler(5, 8, seed=0)
    with pytest.raises(ValueError, match="exceeds"):
        s.apply(m)


def test_dylora_frozen_step_only_touches_row_b_minus_1():
    """One DyLoRA training step in frozen mode updates only A[b-1] and B[:, b-1] (paper Eq. 10)."""
    m = _model(8, 8)
    with torch.no_grad():
        for layer in _layers(m):
            layer.lora_B.weight.normal_()
    set_model_rank(m, 4, frozen=True)
    x = torch.randn(6, 16)
    m(x).square().sum().backward()
    for layer in _layers(m):
        ga, gb = layer.lora_A.weight.grad, layer.lora_B.weight.grad
        assert ga is not None and gb is not None
        zero_rows = [i for i in range(8) if i != 3]
        assert torch.count_nonzero(ga[zero_rows]) == 0
        assert torch.count_nonzero(gb[:, zero_rows]) == 0
        assert torch.count_nonzero(ga[3]) > 0 and torch.count_nonzero(gb[:, 3]) > 0


def test_set_model_rank_refuses_merged_layer_and_changes_nothing():
    m = _model(8, 8)
    set_model_rank(m, 4)
    m[2][0].merge()
    with pytest.raises(RuntimeError, match=r"'2\.0' is merged"):
        set_model_rank(m, 2)
    assert all(layer.active_rank == 4 for layer in _layers(m))
    m[2][0].unmerge()
    assert set_model_rank(m, 2) == 2
