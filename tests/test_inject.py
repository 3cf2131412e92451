"""inject_adapters / inject_multi_lora / remove_adapters on a small nn.Module tree: peft's module selection rules
(names, regex, "all-linear", exclude, rank/alpha patterns), freezing, no nesting, errors, and the exact inverse."""

import pytest
import torch
from torch import nn

from lowrank_kernels import (
    AdaLoRALinear,
    DoRALinear,
    LoRALinear,
    MultiLoRALinear,
    adapter_layers,
    find_target_modules,
    inject_adapters,
    inject_multi_lora,
    remove_adapters,
    serve_batch,
    set_model_rank,
)

D = 16


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x) * self.k_proj(x)) + self.v_proj(x))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(D, 2 * D), nn.Linear(2 * D, D, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(D), Attention(), MLP()

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h) + self.mlp(h)


class Tiny(nn.Module):
    """Two blocks and an output layer that ``get_output_embeddings`` names (as transformers models do)."""

    def __init__(self, with_output_embeddings: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, 10)
        if not with_output_embeddings:
            self.get_output_embeddings = None

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def tiny(**kwargs) -> Tiny:
    torch.manual_seed(0)
    return Tiny(**kwargs).double().eval()


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero adapters (init has B = 0 / lambda = 0: every comparison would be trivial)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


X = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# Two float64 computations of the same function that differ only in summation order (a GEMM blocked differently,
# e.g. a row without an adapter computed inside a batch of other rows): each dot product of length <= 2 * D is
# reordered, so they agree to a few dozen units of float64's epsilon, relative. A wrong term moves them by > 1e-3.
REORDERED = 64 * torch.finfo(torch.float64).eps


ALL = [
    f"layers.{i}.{m}"
    for i in (0, 1)
    for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj")
]


# ---- selection ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        pytest.param(["q_proj", "v_proj"], None, [n for n in ALL if n.endswith(("q_proj", "v_proj"))], id="names"),
        pytest.param(["layers.1.mlp.up_proj"], None, ["layers.1.mlp.up_proj"], id="dotted-suffix"),
        pytest.param({"q_proj", "down_proj"}, None, [n for n in ALL if n.endswith(("q_proj", "down_proj"))], id="set"),
        pytest.param(r"layers\.1\..*_proj", None, ALL[6:], id="regex-fullmatch"),
        pytest.param("all-linear", None, ALL, id="all-linear"),
        pytest.param(
            "ALL-LINEAR",
            ["q_proj", "layers.0.mlp.up_proj"],
            [n for n in ALL if "q_proj" not in n and n != "layers.0.mlp.up_proj"],
            id="all-linear-exclude-list",
        ),
        pytest.param(
            ["q_proj", "o_proj"], r".*\.1\..*", ["layers.0.attn.q_proj", "layers.0.attn.o_proj"], id="exclude-regex"
        ),
    ],
)
def test_selection_follows_peft(targets, exclude, expected):
    model = tiny()
    assert find_target_modules(model, targets, exclude) == expected
    assert inject_adapters(model, targets, exclude_modules=exclude) == expected
    assert [n for n, _ in adapter_layers(model)] == expected


def test_all_linear_keeps_the_output_layer_only_when_the_model_names_it():
    assert "head" not in find_target_modules(tiny(), "all-linear")
    assert find_target_modules(tiny(with_output_embeddings=False), "all-linear") == [*ALL, "head"]


def test_a_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        find_target_modules(tiny(), "q_proj")  # peft: re.fullmatch, so a bare leaf name as a string matches nothing


@pytest.mark.parametrize(
    "method, cls", [("lora", LoRALinear), ("dylora", LoRALinear), ("dora", DoRALinear), ("adalora", AdaLoRALinear)]
)
def test_methods_wrap_share_weights_and_start_as_the_base(method, cls):
    model = tiny()
    y0 = model(X)
    weights = {n: model.get_submodule(n).weight for n in ALL}
    inject_adapters(model, "all-linear", method=method, r=4, alpha=8)
    for name in ALL:
        layer = model.get_submodule(name)
        assert type(layer) is cls and layer.weight is weights[name]  # shared, not copied
    torch.testing.assert_close(model(X), y0, rtol=1e-13, atol=1e-13)  # peft's inits: the adapter starts at zero


def test_rank_and_alpha_patterns_first_key_wins():
    model = tiny()
    inject_adapters(
        model,
        ["q_proj", "up_proj"],
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 2, "layers.1.attn.q_proj": 6},
        alpha_pattern={"layers.1.attn.q_proj": 3, r"layers\.\d\.mlp\.up_proj": 5},
    )
    r = {n: m.r for n, m in adapter_layers(model)}
    alpha = {n: m.lora_alpha for n, m in adapter_layers(model)}
    assert r == {
        "layers.0.attn.q_proj": 2,
        "layers.0.mlp.up_proj": 4,
        "layers.1.attn.q_proj": 2,
        "layers.1.mlp.up_proj": 4,
    }  # "q_proj" comes first and matches layer 1 too
    assert alpha == {
        "layers.0.attn.q_proj": 8,
        "layers.0.mlp.up_proj": 5,
        "layers.1.attn.q_proj": 3,
        "layers.1.mlp.up_proj": 5,
    }
    model = tiny()
    inject_adapters(model, ["q_proj"], r=4, rank_pattern={"layers.1.attn.q_proj": 6, "q_proj": 2})
    assert [m.r for _, m in adapter_layers(model)] == [2, 6]


def test_only_adapters_train():
    model = tiny()
    inject_adapters(model, ["q_proj"], method="dora")
    inject_adapters(model, ["up_proj"], method="adalora", r=3)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = sorted(
        f"layers.{i}.{m}"
        for i in (0, 1)
        for m in (
            "attn.q_proj.lora_A.weight",
            "attn.q_proj.lora_B.weight",
            "attn.q_proj.lora_magnitude_vector",
            "mlp.up_proj.lora_A",
            "mlp.up_proj.lora_B",
            "mlp.up_proj.lora_E",
        )
    )
    assert trainable == expected  # base weights, biases, norms, the head and AdaLoRA's ranknum stay frozen
    model(X).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in expected)


def test_second_injection_never_nests():
    model = tiny()
    inject_adapters(model, ["q_proj"])
    with pytest.raises(ValueError, match="'layers.0.attn.q_proj' already has an adapter"):
        inject_adapters(model, ["q_proj", "k_proj"])
    assert [n for n, _ in adapter_layers(model)] == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]  # untouched
    assert inject_adapters(model, "all-linear") == [n for n in ALL if "q_proj" not in n]  # not the lora_A / lora_B
    assert all(type(model.get_submodule(n).lora_A) is nn.Linear for n in ALL)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_adapters(model, "all-linear")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param(dict(target_modules=["nope"]), ValueError, "matched no nn.Linear in Tiny", id="no-match"),
        pytest.param(dict(target_modules=["mlp"]), TypeError, "'layers.0.mlp' is a MLP; only nn.Linear", id="mlp"),
        pytest.param(dict(target_modules=["norm"]), TypeError, "is a LayerNorm", id="norm"),
        pytest.param(dict(target_modules="q_proj("), ValueError, "not a valid regular expression", id="bad-regex"),
        pytest.param(
            dict(target_modules=["q_proj"], exclude_modules="(("), ValueError, "exclude_modules", id="bad-exclude"
        ),
        pytest.param(dict(target_modules=3), TypeError, "target_modules must be", id="bad-type"),
        pytest.param(dict(target_modules=["q_proj", ""]), TypeError, "target_modules must be", id="empty-name"),
        pytest.param(
            dict(target_modules=["q_proj"], method="vera"), ValueError, "method must be one of", id="bad-method"
        ),
        pytest.param(
            dict(target_modules=["q_proj"], method="adalora", rslora=True), ValueError, "rslora", id="adalora-rslora"
        ),
        pytest.param(
            dict(target_modules=["q_proj"], rank_pattern={"layers.1.attn.q_proj": 0}),
            ValueError,
            "module 'layers.1.attn.q_proj': r must be a positive int",
            id="bad-pattern-r",
        ),
        pytest.param(dict(target_modules=["q_proj"], dropout=1.5), ValueError, "dropout", id="bad-dropout"),
        pytest.param(dict(target_modules=["q_proj"], bias="some"), ValueError, "bias must be one of", id="bad-bias"),
    ],
)
def test_errors_leave_the_model_untouched(kwargs, error, message):
    model = tiny()
    with pytest.raises(error, match=message):
        inject_adapters(model, **kwargs)
    assert not adapter_layers(model)
    assert all(p.requires_grad for p in model.parameters())


class SignLinear(nn.Linear):
    """An nn.Linear subclass with its own forward (as transformers' BitNet AutoBitLinear): wrapping it in an adapter
    layer would silently compute x W^T instead."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.sign(), self.bias)


class PlainSubclass(nn.Linear):
    """An nn.Linear subclass that keeps nn.Linear's forward: it computes x W^T + b and can be wrapped."""


def with_embedding_and(layer: nn.Module) -> Tiny:
    model = tiny()
    model.layers[0].attn.q_proj = layer.double()
    model.embed = nn.Embedding(10, D).double()
    return model


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: inject_adapters(m, ["q_proj"]), id="names"),
        pytest.param(lambda m: inject_adapters(m, "all-linear", method="dora"), id="all-linear"),
        pytest.param(lambda m: inject_multi_lora(m, ["q_proj", "v_proj"], capacity=2, max_rank=2), id="multi"),
    ],
)
def test_a_linear_subclass_with_its_own_forward_is_refused_before_the_model_changes(call):
    model = with_embedding_and(SignLinear(D, D))
    with pytest.raises(TypeError, match=r"'layers.0.attn.q_proj' is a SignLinear; .*subclass with its own forward"):
        call(model)
    assert not adapter_layers(model) and type(model.layers[0].attn.q_proj) is SignLinear
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="SignLinear is an nn.Linear subclass with its own forward"):
        LoRALinear.from_linear(model.layers[0].attn.q_proj, r=2)


def test_a_linear_subclass_keeping_linear_forward_is_wrapped_and_an_embedding_is_refused_in_words():
    model = with_embedding_and(PlainSubclass(D, D))
    assert inject_adapters(model, ["q_proj"]) == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]
    with pytest.raises(TypeError, match="'embed' is a Embedding; .*LoRA on an nn.Embedding is not supported"):
        inject_adapters(model, ["embed", "k_proj"])
    assert [n for n, _ in adapter_layers(model)] == ["layers.0.attn.q_proj", "layers.1.attn.q_proj"]


def test_layers_to_transform_and_modules_to_save():
    model = tiny()
    names = inject_adapters(model, ["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers",
                            modules_to_save=["head"], bias="lora_only")  # fmt: skip
    assert names == ["layers.1.attn.q_proj", "layers.1.mlp.up_proj"]
    assert type(model.head).__name__ == "ModulesToSave" and model.head.original_module is not model.head.trainable_copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A.weight", "lora_B.weight", "bias")} | {
        "head.modules_to_save.default.weight", "head.modules_to_save.default.bias"}  # fmt: skip
    y0 = model(X)
    with torch.no_grad():
        model.head.trainable_copy.weight.add_(1.0)
    assert rel_err(model(X), y0) > 1e-2  # the forward runs the copy
    remove_adapters(model, merge=True)  # merge_and_unload keeps the trained copy
    assert type(model.head) is nn.Linear and rel_err(model(X), tiny()(X)) > 1e-2


# ---- remove_adapters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_remove_adapters_restores_or_merges(method):
    original = tiny()
    y0 = original(X)
    weights0 = {n: p.detach().clone() for n, p in original.named_parameters()}

    model = tiny()
    names = inject_adapters(model, "all-linear", method=method, r=4, alpha=6)
    randomise(model)
    if method == "adalora":
        model.get_submodule(names[0]).set_triplet_mask(torch.tensor([True, False, True, False]))
    if method == "lora":
        set_model_rank(model, 3)  # a truncated DyLoRA rank is what merges
    model.get_submodule(names[1]).merge()  # a layer merged in place: unmerged on removal
    y_adapter = model(X)
    assert rel_err(y_adapter, y0) > 1e-2

    assert remove_adapters(model) == names
    assert not adapter_layers(model) and all(type(model.get_submodule(n)) is nn.Linear for n in names)
    torch.testing.assert_close(model(X), y0, rtol=1e-13, atol=1e-13)  # the merged one: within float64 rounding
    for n, p in model.named_parameters():
        assert not p.requires_grad
        if ALL[1] not in n:  # every never-merged weight is bit-exact
            assert torch.equal(p, weights0[n]), n

    model = tiny()
    inject_adapters(model, "all-linear", method=method, r=4, alpha=6)
    randomise(model)
    y_adapter = model(X)
    remove_adapters(model, merge=True)
    assert not adapter_layers(model)
    assert rel_err(model(X), y_adapter) < 1e-13


def test_remove_adapters_refuses_a_root_layer_and_merging_pools():
    with pytest.raises(TypeError, match="model is itself a LoRALinear"):
        remove_adapters(LoRALinear(4, 4, r=2))
    model = tiny()
    inject_multi_lora(model, ["q_proj"], capacity=2, max_rank=4)
    with pytest.raises(ValueError, match="MultiLoRALinear holds many adapters"):
        remove_adapters(model, merge=True)
    y0 = tiny()(X)
    remove_adapters(model)
    assert torch.equal(model(X), y0)  # bitwise by construction: the same nn.Linear calls on the same tensors


# ---- inject_multi_lora ------------------------------------------------------------------------------------------


def test_inject_multi_lora_serves_by_name_in_every_layer():
    """Two layers hold the same two adapters in different slots; an adapter absent from a layer is its base there."""
    model = tiny()
    y_base = model(X)
    names = inject_multi_lora(model, ["q_proj", "v_proj"], capacity=3, max_rank=4)
    assert names == [n for n in ALL if n.endswith(("q_proj", "v_proj"))]
    assert all(isinstance(model.get_submodule(n), MultiLoRALinear) for n in names)
    assert inject_multi_lora(model, "all-linear", capacity=1, max_rank=1) == [n for n in ALL if n not in names]
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)

    adapters = {name: (rnd(4, D), rnd(D, 4)) for name in ("a", "b")}
    reference = tiny()
    lora = inject_adapters(reference, names, r=4, alpha=8)
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        order = ("a", "b") if i % 2 == 0 else ("b", "a")  # same SlotInfo, names in other slots
        for adapter in order:
            layer.add_adapter(adapter, *adapters[adapter], alpha=8)
    for name in ALL:  # the other layers know neither adapter: untargeted
        if name not in names:
            model.get_submodule(name).pool.add_untargeted("a")
            model.get_submodule(name).pool.add_untargeted("b")
    with torch.no_grad():
        for adapter in ("a", "b"):
            for name in lora:
                reference.get_submodule(name).lora_A.weight.copy_(adapters[adapter][0])
                reference.get_submodule(name).lora_B.weight.copy_(adapters[adapter][1])
            with serve_batch(model, [adapter, None, adapter, adapter, None]):
                y = model(X)
            expected = reference(X)
            assert rel_err(y[0], expected[0]) < 1e-6 and rel_err(y[2:4], expected[2:4]) < 1e-6  # float32 row scale
            assert rel_err(y[1], y_base[1]) < REORDERED and rel_err(y[4], y_base[4]) < REORDERED  # not bitwise:
            # the pool's GEMM over the whole batch may block the sums differently from the base model's
            assert rel_err(expected, y_base) > 1e-2
    pool = model.get_submodule(ALL[1]).pool  # k_proj: no weights, both names untargeted
    assert pool.untargeted == {"a", "b"} and len(pool) == 0
    with pytest.raises(ValueError, match="registered as not targeting this layer"):
        pool.add("a", *adapters["a"], alpha=8)
    assert pool.remove("a") == -1 and pool.untargeted == {"b"}
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        with serve_batch(model, ["a"] * 5):
            model(X)
