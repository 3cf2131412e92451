"""Bad input to lora_linear raises a clear error naming the argument, before any backend sees it."""

import pytest
import torch
from helpers import make_lora_inputs

from lowrank_kernels import lora_linear


def inputs(**overrides):
    x, weight, bias, A, B, v = make_lora_inputs(5, 24, 16, 4, torch.float32, rank_scale=True, device="cpu")
    args = dict(x=x, weight=weight, bias=bias, lora_A=A, lora_B=B)
    kwargs = dict(scale=1.0, rank=None, rank_scale=v, dropout=0.0)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return args, kwargs


def call(**overrides):
    args, kwargs = inputs(**overrides)
    return lora_linear(*args.values(), **kwargs)


def ok():
    return inputs()[0]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        pytest.param(dict(x=torch.randn(5, 23)), ValueError, "x's last dimension", id="x-width"),
        pytest.param(dict(x=torch.randn(())), ValueError, "x must have at least one dimension", id="x-scalar"),
        pytest.param(dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor", id="x-list"),
        pytest.param(dict(x=torch.ones(5, 24, dtype=torch.int64)), TypeError, "x must be a floating", id="x-int"),
        pytest.param(dict(weight=torch.randn(16, 24, 1)), ValueError, "weight must be 2-D", id="weight-3d"),
        pytest.param(dict(lora_A=torch.randn(4, 25)), ValueError, "lora_A must be", id="A-width"),
        pytest.param(dict(lora_B=torch.randn(16, 5)), ValueError, "lora_B must be", id="B-rank"),
        pytest.param(dict(lora_B=torch.randn(17, 4)), ValueError, "lora_B must be", id="B-out"),
        pytest.param(dict(bias=torch.randn(15)), ValueError, "bias must be", id="bias-len"),
        pytest.param(dict(rank_scale=torch.randn(3)), ValueError, "rank_scale must be", id="rank_scale-len"),
        pytest.param(dict(rank=0), ValueError, "rank must be in", id="rank-0"),
        pytest.param(dict(rank=5), ValueError, "rank must be in", id="rank-too-big"),
        pytest.param(dict(rank=2.0), TypeError, "rank must be an int", id="rank-float"),
        pytest.param(dict(rank=True), TypeError, "rank must be an int", id="rank-bool"),
        pytest.param(dict(dropout=1.0), ValueError, "dropout must be in", id="dropout-1"),
        pytest.param(dict(dropout=-0.1), ValueError, "dropout must be in", id="dropout-neg"),
        pytest.param(dict(scale=float("nan")), ValueError, "scale must be a finite", id="scale-nan"),
        pytest.param(dict(dropout=0.1, seed=-1), ValueError, "seed must be", id="seed-neg"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        call(**overrides)


@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B", "rank_scale"])
def test_dtype_mismatch(name):
    args, kwargs = inputs()
    target = args if name in args else kwargs
    target[name] = target[name].double()
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float64 but x has torch.float32"):
        lora_linear(*args.values(), **kwargs)


@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B", "rank_scale"])
def test_device_mismatch(name):
    """A tensor on another device is rejected by name (the meta device stands in for a GPU on CPU machines)."""
    args, kwargs = inputs()
    target = args if name in args else kwargs
    target[name] = target[name].to("meta")
    with pytest.raises(ValueError, match=f"{name} is on meta but x is on cpu"):
        lora_linear(*args.values(), **kwargs)
