"""peft interop on a real architecture: a 2-layer transformers Llama (random weights, float64, nothing downloaded).

peft adapter directories written by peft's ``save_pretrained`` load with ``load_peft_adapter`` and give peft's logits
and adapter gradients (LoRA, rsLoRA, DoRA, AdaLoRA after a real allocation, rank/alpha patterns); ours saved with
``save_peft_adapter`` load with ``peft.PeftModel.from_pretrained`` and give ours; several peft adapters served in one
mixed batch by ``MultiLoRALinear`` give peft's per-adapter outputs; and bad files fail naming what is wrong.
Adapter weights are randomised (peft's init has B = 0 or lambda = 0, which would make every comparison trivial).
"""

import copy
import json
import shutil

import pytest
import torch
from helpers import rel_err, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lowrank_kernels import (  # noqa: E402  (after the skips: these tests need peft and transformers)
    AdaLoRAConfig,
    AdaLoRALinear,
    DoRALinear,
    LoRALinear,
    MultiLoRALinear,
    adapter_layers,
    inject_adapters,
    load_peft_adapter,
    load_peft_adapters_for_serving,
    save_peft_adapter,
    serve_batch,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore::FutureWarning",
    "ignore:The following rank_pattern keys did not match:RuntimeWarning",  # peft, on its own AdaLoRA files
)

VOCAB, SEQ = 128, 7
# float64 end to end: the two implementations differ only in summation order (~1e-16); a wrong scale, rank or
# dropped term moves the logits by > 1e-3.
TOL = 1e-10


@pytest.fixture(scope="module")
def base():
    return tiny_llama(VOCAB).to(torch.float64).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Adapter weights of O(1) effect: A, B (P, Q) ~ N(0, 0.1^2), lambda ~ N(0, 1), DoRA's m = ||W0|| (1 + 0.2 N)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        elif "lora_E" in name:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        elif "lora_A" in name or "lora_B" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def our_name(peft_name: str) -> str:
    """peft's live parameter name -> ours (``LoRALinear`` / ``DoRALinear`` / ``AdaLoRALinear``)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def loss_and_grads(model, ids, our_names=False):
    """Logits and the gradients of every trainable parameter after one fixed random projection of the logits."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    (logits * w).sum().backward()
    grads = {
        n if our_names else our_name(n): torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return logits.detach(), grads


def allocate_adalora(peft_model, ids, steps: int) -> None:
    """A few real AdaLoRA allocation steps (peft's RankAllocator), ending with its final, forced mask."""
    for step in range(steps):
        peft_model.zero_grad()
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        peft_model.base_model.update_and_allocate(step)
    peft_model.zero_grad()


CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora-all-linear": lambda: peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj"]),
    "patterns": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.(q_proj|gate_proj|o_proj)",
        exclude_modules=["layers.1.self_attn.o_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "gate_proj": 6},
        alpha_pattern={"layers.0.mlp.gate_proj": 3},
    ),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=6,
        target_r=3,
        tinit=0,
        tfinal=0,
        deltaT=1,
        total_step=3,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "up_proj"],
    ),
}


def peft_adapter(base, ids, kind: str, directory, seed: int = 0):
    """A randomised peft model of ``kind`` saved with peft's own save_pretrained into ``directory``."""
    model = peft.get_peft_model(copy.deepcopy(base), CONFIGS[kind]())
    randomise(model, seed)
    if kind == "adalora":
        allocate_adalora(model, ids, steps=4)  # total_step 3: the step-3 call is the final, forced mask
    model.eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_load_peft_adapter_matches_peft(base, ids, kind, tmp_path):
    peft_model = peft_adapter(base, ids, kind, tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()

    ours = copy.deepcopy(base)
    names = load_peft_adapter(ours, tmp_path)
    cls = {"dora": DoRALinear, "adalora": AdaLoRALinear}.get(kind, LoRALinear)
    assert [n for n, _ in adapter_layers(ours)] == names and all(type(m) is cls for _, m in adapter_layers(ours))
    if kind == "rslora-all-linear":
        assert "lm_head" not in names and len(names) == 14  # 7 linears per layer, not the output layer
    if kind == "patterns":
        assert ours.get_submodule("model.layers.1.self_attn.q_proj").r == 2
        assert ours.get_submodule("model.layers.0.mlp.gate_proj").lora_alpha == 3
        assert "model.layers.1.self_attn.o_proj" not in names

    logits, grads = loss_and_grads(ours, ids, our_names=True)
    ref_logits, ref_grads = loss_and_grads(reference, ids)
    with torch.no_grad():
        assert rel_err(logits, peft_model(input_ids=ids).logits) < TOL  # peft's model before saving
    assert rel_err(logits, ref_logits) < TOL
    assert rel_err(logits, base(input_ids=ids).logits) > 1e-2  # the adapters matter

    # peft 0.21 leaves ranknum trainable after from_pretrained(is_trainable=True) of a resized AdaLoRA layer (a
    # peft quirk: it is a constant, init_r); ours keeps it frozen.
    ref_grads = {n: g for n, g in ref_grads.items() if not n.endswith(".ranknum")}
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        ref = ref_grads[name]
        if kind == "adalora":  # peft resized the layer to its kept triplets; ours keeps init_r and masks the rest
            keep = ours.get_submodule(name.rsplit(".", 1)[0]).triplet_mask
            if keep is not None:
                dim = 1 if name.endswith("lora_B") else 0
                assert g.index_select(dim, (~keep).nonzero().view(-1)).abs().max() == 0, name
                g = g.index_select(dim, keep.nonzero().view(-1))
        assert g.shape == ref.shape, name
        if ref.numel():  # (an AdaLoRA layer may keep no triplet)
            assert ref.norm() > 0 and rel_err(g, ref) < TOL, name
    if kind == "adalora":
        masks = [m.triplet_mask for _, m in adapter_layers(ours)]
        assert any(k is not None and not k.all() for k in masks)  # the allocation really masked triplets


ROUND_TRIPS = {
    "lora": dict(method="lora", target_modules=["q_proj", "v_proj", "gate_proj"], r=4, alpha=8),
    "dora-rslora": dict(method="dora", target_modules=["k_proj", "down_proj"], r=4, alpha=6, rslora=True),
    "adalora": dict(method="adalora", target_modules=["q_proj", "up_proj"], r=6, alpha=12),
    "mixed-ranks": dict(
        method="lora",
        target_modules="all-linear",
        r=4,
        alpha=8,
        rank_pattern={"layers.1.mlp.up_proj": 6, "o_proj": 2},
        alpha_pattern={"k_proj": 5},
    ),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_save_peft_adapter_loads_in_peft(base, ids, case, tmp_path):
    ours = copy.deepcopy(base)
    names = inject_adapters(ours, **ROUND_TRIPS[case])
    randomise(ours, seed=3)
    if case == "adalora":
        layer = ours.get_submodule(names[0])
        layer.set_triplet_mask(torch.tensor([True, False, True, True, False, True]))
        ours.get_submodule(names[1]).set_triplet_mask(torch.tensor([False] * 6))  # a layer with nothing kept
    if case == "mixed-ranks":
        ours.get_submodule("model.layers.0.mlp.gate_proj").set_rank(3)  # DyLoRA: saved as its rank-3 truncation
    ours.eval()
    schedule = AdaLoRAConfig(target_r=2, init_r=6, tinit=5, tfinal=10, total_step=50) if case == "adalora" else None
    assert save_peft_adapter(ours, tmp_path, adalora_config=schedule) == names
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert rel_err(loaded(input_ids=ids).logits, logits) < TOL
        assert rel_err(logits, base(input_ids=ids).logits) > 1e-2
        again = copy.deepcopy(base)  # and back through our own loader
        assert load_peft_adapter(again, tmp_path) == names
        assert rel_err(again.eval()(input_ids=ids).logits, logits) < TOL

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if case == "mixed-ranks":  # exact per-module keys, only where a layer differs from the most common value
        assert config["r"] == 4 and config["lora_alpha"] == 8
        assert config["rank_pattern"] == {
            "model.layers.1.mlp.up_proj": 6,
            "model.layers.0.self_attn.o_proj": 2,
            "model.layers.1.self_attn.o_proj": 2,
            "model.layers.0.mlp.gate_proj": 3,
        }
        assert config["alpha_pattern"] == {"model.layers.0.self_attn.k_proj": 5, "model.layers.1.self_attn.k_proj": 5}
        assert sorted(config["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
    if case == "adalora":
        assert config["peft_type"] == "ADALORA" and config["init_r"] == 6
        assert (config["target_r"], config["tinit"], config["tfinal"], config["total_step"]) == (2, 5, 10, 50)
        assert config["rank_pattern"][f"{names[0]}.lora_E"] == [True, False, True, True, False, True]


def test_serving_mixed_batch_matches_peft_per_adapter(base, ids, tmp_path):
    """Four peft adapters (LoRA, rsLoRA on all linears, DoRA on one module type, AdaLoRA) served in one batch."""
    configs = {
        "sql": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        "chat": peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
        "tone": peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["q_proj"]),
    }
    reference = None
    for i, (name, config) in enumerate(configs.items()):
        model = peft.get_peft_model(copy.deepcopy(base), config)
        randomise(model, seed=10 + i)
        model.save_pretrained(tmp_path / name)
        if reference is None:
            reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name, adapter_name=name)
        else:
            reference.load_adapter(tmp_path / name, adapter_name=name)
    reference.eval()
    ada = peft_adapter(base, ids, "adalora", tmp_path / "svd", seed=20)

    ours = copy.deepcopy(base)
    paths = {name: tmp_path / name for name in [*configs, "svd"]}
    layers = load_peft_adapters_for_serving(ours, paths)
    assert len(layers) == 14 and all(isinstance(m, MultiLoRALinear) for n, m in ours.named_modules() if n in layers)
    q0 = ours.get_submodule("model.layers.0.self_attn.q_proj").pool
    k0 = ours.get_submodule("model.layers.0.self_attn.k_proj").pool
    assert {"sql", "chat", "tone"} <= set(q0.names) and q0.slots[q0.slot("tone")].dora
    assert set(k0.names) == {"chat"} and k0.untargeted == {"sql", "tone", "svd"}
    for _, m in ours.named_modules():  # every layer knows every adapter: loaded, or untargeted (AdaLoRA: none kept)
        assert not isinstance(m, MultiLoRALinear) or set(m.pool.names) | m.pool.untargeted == set(paths)

    batch = ["sql", None, "tone", "chat", "svd", "tone"]
    x = torch.cat([ids, ids.flip(0)])  # 6 sequences
    with torch.no_grad(), serve_batch(ours, batch):
        logits = ours(input_ids=x).logits
    with torch.no_grad():
        for i, name in enumerate(batch):
            if name is None:
                expected = base(input_ids=x[i : i + 1]).logits
            elif name == "svd":
                expected = ada(input_ids=x[i : i + 1]).logits
            else:
                reference.set_adapter(name)
                expected = reference(input_ids=x[i : i + 1]).logits
            # The batch carries each row's scale in float32 (AdapterBatch.row_scale): ~1e-7 of the adapter term.
            assert rel_err(logits[i : i + 1], expected) < 1e-6, (i, name)
            assert name is None or rel_err(logits[i : i + 1], base(input_ids=x[i : i + 1]).logits) > 1e-3


def test_serving_errors_leave_the_model_alone(base, ids, tmp_path):
    peft_adapter(base, ids, "lora", tmp_path / "a")
    ours = copy.deepcopy(base)
    with pytest.raises(ValueError, match="max_rank 2"):
        load_peft_adapters_for_serving(ours, {"a": tmp_path / "a"}, max_rank=2)
    assert not any(isinstance(m, MultiLoRALinear) for m in ours.modules())
    load_peft_adapters_for_serving(ours, {"a": tmp_path / "a"}, capacity=2)
    with pytest.raises(ValueError, match="already has adapters named"):
        load_peft_adapters_for_serving(ours, {"a": tmp_path / "a"})
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        with torch.no_grad(), serve_batch(ours, ["b", None, None]):
            ours(input_ids=ids)


# ---- formats and errors -----------------------------------------------------------------------------------------


def test_bin_file_and_adapter_subfolder(base, ids, tmp_path):
    """``adapter_model.bin`` (safe_serialization=False) and peft's subfolder for a second adapter name."""
    model = peft.get_peft_model(copy.deepcopy(base), CONFIGS["lora"]())
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"]))
    randomise(model, seed=4)
    model.eval().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "second" / "adapter_model.bin").is_file()
    with torch.no_grad():
        for adapter in ("default", "second"):
            ours = copy.deepcopy(base)
            load_peft_adapter(ours, tmp_path, adapter_name=None if adapter == "default" else adapter)
            model.set_adapter(adapter)
            assert rel_err(ours.eval()(input_ids=ids).logits, model(input_ids=ids).logits) < TOL


@pytest.fixture(scope="module")
def saved_lora(base, ids, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    peft_adapter(base, ids, "lora", directory)
    return directory


def edited(saved, tmp_path, config=None, tensors=None):
    """A copy of the saved adapter with its config and/or tensors edited by the given functions."""
    directory = tmp_path / "edited"
    shutil.copytree(saved, directory)
    if config is not None:
        data = json.loads((directory / "adapter_config.json").read_text())
        config(data)
        (directory / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        data = safetensors_torch.load_file(directory / "adapter_model.safetensors")
        tensors(data)
        safetensors_torch.save_file(data, directory / "adapter_model.safetensors")
    return directory


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"

BAD_FILES = {
    "layers_to_transform": (  # supported; but then the file's layer-1 weights are not targeted
        dict(config=lambda c: c.update(layers_to_transform=[0])),
        ValueError,
        "weights for modules the config does not target",
    ),
    "bias-tensor-with-bias-none": (
        dict(tensors=lambda t: t.update({f"{Q0}.base_layer.bias": torch.zeros(32)})),
        ValueError,
        r"unexpected tensors .*base_layer.bias.* \(bias tensors in a file whose config says bias='none'\)",
    ),
    "bias-unknown-mode": (dict(config=lambda c: c.update(bias="some")), ValueError, "bias='some' is not one of"),
    "modules_to_save-not-in-model": (  # peft's SEQ_CLS default names no module of a causal LM: the copy is absent
        dict(
            config=lambda c: c.update(modules_to_save=["classifier"]),
            tensors=lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(128, 32)}),
        ),
        ValueError,
        r"unexpected tensors .*'base_model.model.lm_head.weight'",
    ),
    "lora_bias": (
        dict(config=lambda c: c.update(lora_bias=True)),
        ValueError,
        "lora_bias, a trainable bias on lora_B, is not supported",
    ),
    "pissa": (
        dict(config=lambda c: c.update(init_lora_weights="pissa_niter_4")),
        ValueError,
        "init_lora_weights='pissa_niter_4' \\(the PiSSA initialisation is not supported",
    ),
    "olora": (dict(config=lambda c: c.update(init_lora_weights="olora")), ValueError, "the OLoRA initialisation"),
    "embedding-tensors": (
        dict(tensors=lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 128)})),
        ValueError,
        "LoRA on an nn.Embedding is not supported",
    ),
    "embedding-target": (
        dict(config=lambda c: c.update(target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
        TypeError,
        "'model.embed_tokens' is a Embedding; .*LoRA on an nn.Embedding is not supported",
    ),
    "unknown-field": (
        dict(config=lambda c: c.update(shiny_new_option=3)),
        ValueError,
        "shiny_new_option=3 \\(a field this loader does not know\\)",
    ),
    "peft-type": (dict(config=lambda c: c.update(peft_type="IA3")), ValueError, "peft_type 'IA3' is not supported"),
    "missing-key": (
        dict(tensors=lambda t: t.pop(f"{Q0}.lora_B.weight")),
        ValueError,
        f"missing tensors: '{Q0}.lora_B.weight'",
    ),
    "unexpected-key": (
        dict(tensors=lambda t: t.update({f"{Q0}.lora_C.weight": torch.zeros(2)})),
        ValueError,
        f"unexpected tensors for a lora adapter: '{Q0}.lora_C.weight'",
    ),
    "dora-key-in-lora": (
        dict(tensors=lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(32)})),
        ValueError,
        "lora_magnitude_vector",
    ),
    "wrong-shape": (
        dict(config=lambda c: c.update(r=5)),
        ValueError,
        rf"'{Q0}.lora_A.weight' has shape \[4, 32\]; .* needs \[5, 32\]",
    ),
    "wrong-shape-pattern": (
        dict(config=lambda c: c.update(rank_pattern={"layers.1.mlp.down_proj": 3})),
        ValueError,
        r"down_proj.lora_A.weight' has shape \[4, 64\]; .* needs \[3, 64\]",
    ),
    "more-targets": (
        dict(config=lambda c: c.update(target_modules=["q_proj", "v_proj", "down_proj", "k_proj"])),
        ValueError,
        "targeted modules without weights in the file: 'model.layers.0.self_attn.k_proj'",
    ),
    "fewer-targets": (
        dict(config=lambda c: c.update(target_modules=["q_proj", "v_proj"])),
        ValueError,
        "weights for modules the config does not target",
    ),
    "non-linear-target": (
        dict(config=lambda c: c.update(target_modules=["mlp"])),
        TypeError,
        "'model.layers.0.mlp' is a LlamaMLP",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_files_raise_naming_the_problem(base, saved_lora, tmp_path, case):
    edits, error, message = BAD_FILES[case]
    directory = edited(saved_lora, tmp_path, **edits)
    ours = copy.deepcopy(base)
    with pytest.raises(error, match=message):
        load_peft_adapter(ours, directory)
    assert not adapter_layers(ours)  # checked before anything was wrapped
    with pytest.raises(error, match=message):
        load_peft_adapters_for_serving(ours, {"x": directory})
    assert not adapter_layers(ours)


def test_neutral_config_values_load(base, ids, saved_lora, tmp_path):
    """Fields at values that cannot change the numbers are accepted (fan_in_fan_out: peft resets it on nn.Linear)."""
    neutral = dict(
        fan_in_fan_out=True,
        init_lora_weights="gaussian",
        layers_pattern=[],
        modules_to_save=None,
        peft_version="9.9.9",
        runtime_config={"ephemeral_gpu_offload": False},
    )
    directory = edited(saved_lora, tmp_path, config=lambda c: c.update(neutral))
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    load_peft_adapter(a, directory)
    load_peft_adapter(b, saved_lora)
    with torch.no_grad():
        # bitwise by construction: the same layers, weights and shapes, so the same kernels in the same order
        assert torch.equal(a.eval()(input_ids=ids).logits, b.eval()(input_ids=ids).logits)


def test_missing_files(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(copy.deepcopy(base), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_peft_adapter(copy.deepcopy(base), tmp_path)


def test_save_refuses_what_peft_cannot_express(base, tmp_path):
    mixed = copy.deepcopy(base)
    inject_adapters(mixed, ["q_proj"], method="lora")
    inject_adapters(mixed, ["v_proj"], method="dora")
    with pytest.raises(ValueError, match="different adapter types"):
        save_peft_adapter(mixed, tmp_path)
    merged = copy.deepcopy(base)
    names = inject_adapters(merged, ["q_proj"], method="lora")
    merged.get_submodule(names[0]).merge()
    with pytest.raises(ValueError, match="unmerge"):
        save_peft_adapter(merged, tmp_path)
    ada = copy.deepcopy(base)
    inject_adapters(ada, ["q_proj"], method="adalora", r=4, rank_pattern={"layers.1.self_attn.q_proj": 6})
    with pytest.raises(ValueError, match="different r"):
        save_peft_adapter(ada, tmp_path)
    with pytest.raises(ValueError, match="no adapter layers"):
        save_peft_adapter(copy.deepcopy(base), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_float32_file_on_a_bfloat16_base_keeps_float32_adapters(base, ids, saved_lora, tmp_path):
    """peft keeps adapters in float32 beside a low-precision base (autocast_adapter_dtype); so does the loader."""
    directory = edited(saved_lora, tmp_path, tensors=lambda t: t.update({k: v.float() for k, v in t.items()}))
    ours = copy.deepcopy(base).to(torch.bfloat16)
    names = load_peft_adapter(ours, directory)
    layer = ours.get_submodule(names[0])
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(ours(input_ids=ids).logits).all()


def test_adalora_rank_pattern_must_fit(base, tmp_path):
    ours = copy.deepcopy(base)
    names = inject_adapters(ours, ["q_proj"], method="adalora", r=4)
    ours.get_submodule(names[0]).set_triplet_mask(torch.tensor([True, False, True, True]))
    save_peft_adapter(ours, tmp_path / "ok")
    key = f"{names[0]}.lora_E"
    for pattern, message in [
        ({key: [True, False, True]}, "must be 4 \\(init_r\\) booleans"),
        ({key: [True, True, True, True]}, r"lora_A' has shape \[3, 32\]; .* needs \[4, 32\]"),
        ({"model.layers.0.mlp.up_proj.lora_E": [True] * 4}, "rank_pattern names modules the adapter does not target"),
    ]:
        shutil.rmtree(tmp_path / "edited", ignore_errors=True)
        directory = edited(tmp_path / "ok", tmp_path, config=lambda c, p=pattern: c.update(rank_pattern=p))
        with pytest.raises(ValueError, match=message):
            load_peft_adapter(copy.deepcopy(base), directory)
