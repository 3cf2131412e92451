"""The models and configs people fine-tune, against peft 0.21 on tiny transformers models (float64, random weights,
nothing downloaded): GPT-2's Conv1D layers (peft's ``fan_in_fan_out``), RoBERTa and DeBERTa-v2 sequence classification
(``task_type="SEQ_CLS"``: a trainable copy of the head, ``modules_to_save``) with ``bias="none" / "lora_only" /
"all"``, and T5 with ``layers_to_transform`` / ``layers_pattern``. In both directions: peft's files load here with
peft's logits and gradients, and ours load in peft with our logits and peft's file layout.
"""

import copy
import json

import pytest
import torch
from helpers import rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers.pytorch_utils import Conv1D  # noqa: E402  (after the skips)

from lowrank_kernels import (  # noqa: E402
    adapter_layers,
    inject_adapters,
    load_peft_adapter,
    load_peft_adapters_for_serving,
    remove_adapters,
    save_peft_adapter,
    serve_batch,
)
from lowrank_kernels.models.inject import ModulesToSave  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCAB, SEQ, BATCH = 64, 6, 3
# float64 end to end: ours and peft's differ only in summation order (~1e-16 relative); a wrong scale, a missing
# bias or head copy, a transposed Conv1D weight moves the logits by > 1e-3.
TOL = 1e-10


# ---- the tiny models ---------------------------------------------------------------------------------------------


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def roberta():
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=16, num_labels=3)  # fmt: skip
    return transformers.RobertaForSequenceClassification(config)


def deberta_v2():
    config = transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                          relative_attention=True, pos_att_type=["p2c", "c2p"],
                                          position_buckets=8)  # fmt: skip
    return transformers.DebertaV2ForSequenceClassification(config)


def t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


MODELS = {"gpt2": gpt2, "roberta": roberta, "deberta-v2": deberta_v2, "t5": t5}  # QLoRA's Llama: qlora_llama
_BASES: dict = {}


def base(kind: str):
    """A fresh float64 copy of the seeded tiny model (biases randomised: transformers initialises them to zero,
    which would hide a bias that is not loaded)."""
    if kind not in _BASES:
        torch.manual_seed(0)
        model = MODELS[kind]().to(torch.float64).eval()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        _BASES[kind] = model
    return copy.deepcopy(_BASES[kind])


def inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(0, VOCAB, (BATCH, 4), generator=g)}
    return {"input_ids": ids}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Adapters, trainable head copies and trainable biases of O(1) effect (peft's init: B = 0, copy = original)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        elif "lora_A" in name or "lora_B" in name or "lora_E" in name:
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        elif p.requires_grad and "ranknum" not in name:  # a modules_to_save copy or a trainable bias (peft's
            # AdaLoRA leaves ranknum requires_grad on a Conv1D layer; it is a constant r, not saved in the file)
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def peft_to_ours(name: str) -> str:
    """peft's live parameter name -> ours: no ``base_model.model.`` prefix, no adapter key in the adapter's own
    parameters, the wrapped layer's parameters without ``base_layer`` (a ``ModulesToSave`` keeps peft's layout)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for part in ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector"):
        name = name.replace(f"{part}.default", part)
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def logits_and_grads(model, kind: str, peft_names: bool):
    """Logits and the gradients of every trainable parameter (our names) after a fixed projection of the logits."""
    model.zero_grad()
    logits = model(**inputs(kind)).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    (logits * w).sum().backward()
    grads = {peft_to_ours(n) if peft_names else n: p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and "ranknum" not in n}  # fmt: skip
    return logits.detach(), grads


def assert_same(ours, ref, kind: str) -> None:
    """Same logits, same trainable parameters, same gradients."""
    logits, grads = logits_and_grads(ours, kind, peft_names=False)
    ref_logits, ref_grads = logits_and_grads(ref, kind, peft_names=True)
    assert rel_err(logits, ref_logits) < TOL
    assert set(grads) == set(ref_grads)
    # Relative to the whole gradient: some are zero but for rounding (an attention key's bias cancels in softmax)
    total = torch.cat([g.reshape(-1) for g in ref_grads.values()]).norm()
    for name, g in grads.items():
        assert (g - ref_grads[name]).norm() < TOL * total, name


def peft_saved(kind: str, config, directory, seed: int = 0):
    """A randomised peft model of ``kind`` with ``config``, saved by peft's save_pretrained into ``directory``."""
    model = peft.get_peft_model(base(kind), config)
    randomise(model, seed)
    model.save_pretrained(directory)
    return model.eval()


def file_keys(directory) -> set[str]:
    return set(safetensors_torch.load_file(directory / "adapter_model.safetensors"))


# ---- GPT-2: Conv1D ----------------------------------------------------------------------------------------------

GPT2_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "dora": lambda: peft.LoraConfig(
        r=4, lora_alpha=6, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    ),  # fmt: skip
    "all-linear": lambda: peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    "adalora": lambda: peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(GPT2_CONFIGS))
def test_gpt2_conv1d_adapter_loads_with_peft_numbers(case, tmp_path):
    ref = peft_saved("gpt2", GPT2_CONFIGS[case](), tmp_path)
    ours = base("gpt2")
    weights = {n: m.weight for n, m in ours.named_modules() if isinstance(m, Conv1D)}
    names = load_peft_adapter(ours, tmp_path)
    peft_targets = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")
                    and hasattr(m, "base_layer")}  # fmt: skip
    assert set(names) == peft_targets
    if case == "all-linear":
        assert len(names) == 8 and "lm_head" not in names  # 4 Conv1D per block, not the output layer
    for name in names:  # the Conv1D's own [in, out] Parameter, not a copy or a transposed clone
        layer = ours.get_submodule(name)
        assert layer.fan_in_fan_out and layer.weight is weights[name] and layer.weight.shape[0] == layer.in_features
    assert_same(ours, ref, "gpt2")


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
def test_gpt2_conv1d_saved_here_loads_in_peft(method, tmp_path):
    ours = base("gpt2")
    original_keys = set(ours.state_dict())
    names = inject_adapters(ours, ["c_attn", "mlp.c_proj"], method=method, r=4, alpha=8)
    randomise(ours, 3)
    assert original_keys <= set(ours.state_dict())  # the base weights keep their keys (and [in, out] shapes)
    assert all(ours.state_dict()[f"{n}.weight"].shape == base("gpt2").get_submodule(n).weight.shape for n in names)
    save_peft_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ref = peft.PeftModel.from_pretrained(base("gpt2"), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(ours(**inputs("gpt2")).logits, ref(**inputs("gpt2")).logits) < TOL
    y = ours(**inputs("gpt2")).logits.detach()
    remove_adapters(ours, merge=True)  # merged into the [in, out] weight, back to plain Conv1D layers
    assert all(type(ours.get_submodule(n)) is Conv1D for n in names)
    with torch.no_grad():
        assert rel_err(ours(**inputs("gpt2")).logits, y) < TOL


def test_gpt2_conv1d_serving_matches_peft_per_adapter(tmp_path):
    refs = {}
    for i, (name, case) in enumerate([("a", "lora"), ("b", "dora")]):
        refs[name] = peft_saved("gpt2", GPT2_CONFIGS[case](), tmp_path / name, seed=i)
    ours = base("gpt2")
    weights = {n: m.weight for n, m in ours.named_modules() if isinstance(m, Conv1D)}
    layers = load_peft_adapters_for_serving(ours, {name: tmp_path / name for name in refs})
    for n in layers:  # the pool's weight is a transposed view of the Conv1D's storage
        assert ours.get_submodule(n).weight.data_ptr() == weights[n].data_ptr()
    order = ["a", None, "b"]
    with torch.no_grad(), serve_batch(ours, order):
        y = ours(**inputs("gpt2")).logits
    with torch.no_grad():
        plain = base("gpt2")(**inputs("gpt2")).logits
        for row, name in enumerate(order):
            expected = plain[row] if name is None else refs[name](**inputs("gpt2")).logits[row]
            assert rel_err(y[row], expected) < 1e-9, (row, name)
    remove_adapters(ours)
    assert all(ours.get_submodule(n) is not None and type(ours.get_submodule(n)) is Conv1D for n in layers)
    assert all(ours.get_submodule(n).weight is weights[n] for n in layers)


# ---- sequence classification: modules_to_save, bias ---------------------------------------------------------------

SEQ_CLS_TARGETS = {"roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"]}


def seq_cls_config(kind: str, bias: str, **extra):
    return peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=SEQ_CLS_TARGETS[kind], bias=bias,
                           **extra)  # fmt: skip


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
@pytest.mark.parametrize("kind", ["roberta", "deberta-v2"])
def test_seq_cls_adapter_loads_with_peft_numbers(kind, bias, tmp_path):
    """peft's GLUE setup: LoRA on the attention, a trainable copy of the head, biases as ``bias`` says."""
    ref = peft_saved(kind, seq_cls_config(kind, bias), tmp_path)
    assert any(k.startswith("base_model.model.classifier.") and "lora_" not in k for k in file_keys(tmp_path))
    ours = base(kind)
    load_peft_adapter(ours, tmp_path)
    assert isinstance(ours.classifier, ModulesToSave)
    assert all(not p.requires_grad for p in ours.classifier.original_module.parameters())
    assert_same(ours, ref, kind)  # the trainable sets agree too: the biases and the head copy's parameters


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
@pytest.mark.parametrize("kind", ["roberta", "deberta-v2"])
def test_seq_cls_saved_here_is_peft_file_and_loads_in_peft(kind, bias, tmp_path):
    peft_saved(kind, seq_cls_config(kind, bias), tmp_path / "peft")
    ours = base(kind)
    inject_adapters(ours, SEQ_CLS_TARGETS[kind], r=4, alpha=8, bias=bias, modules_to_save=["classifier", "score"],
                    task_type="SEQ_CLS")  # fmt: skip
    randomise(ours, 4)
    save_peft_adapter(ours, tmp_path / "ours", bias=bias, task_type="SEQ_CLS")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")
    ref = peft.PeftModel.from_pretrained(base(kind), tmp_path / "ours").eval()
    assert type(ref).__name__ == "PeftModelForSequenceClassification"
    with torch.no_grad():
        assert rel_err(ours(**inputs(kind)).logits, ref(**inputs(kind)).logits) < TOL
        head = ours.classifier
        remove_adapters(ours)  # peft's unload: the original head, not the trained copy; trained biases stay
        assert ours.classifier is head.original_module
        unloaded = ours(**inputs(kind)).logits
    if bias == "none":
        assert rel_err(unloaded, base(kind)(**inputs(kind)).logits) < TOL
    else:
        trained = {n: p for n, p in ours.named_parameters() if n.endswith(".bias")}
        plain = base(kind)
        assert any(not torch.equal(trained[n], p) for n, p in plain.named_parameters() if n in trained)
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert rel_err(unloaded, plain(**inputs(kind)).logits) < TOL


def test_seq_cls_all_linear_skips_the_head_like_peft(tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules="all-linear")
    ref = peft_saved("deberta-v2", config, tmp_path)
    ours = base("deberta-v2")
    names = load_peft_adapter(ours, tmp_path)
    assert "classifier" not in names and "pooler.dense" in names  # the head is a copy, the pooler a target
    assert_same(ours, ref, "deberta-v2")


def test_seq_cls_adapter_cannot_be_served_in_a_mixed_batch(tmp_path):
    peft_saved("roberta", seq_cls_config("roberta", "none"), tmp_path)
    ours = base("roberta")
    with pytest.raises(ValueError, match=r"trains modules_to_save copies \('classifier'\).*cannot serve it"):
        load_peft_adapters_for_serving(ours, {"x": tmp_path})
    assert not adapter_layers(ours)


# ---- T5: layers_to_transform / layers_pattern, a bias-free model ----------------------------------------------------

T5_CONFIGS = {
    "layers_to_transform": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "v", "wo"], layers_to_transform=[1]
    ),  # fmt: skip
    "layers_pattern": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "k"], layers_to_transform=[0], layers_pattern="block"
    ),  # fmt: skip
    "lora_only-bias-free": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], bias="lora_only"),
    "all-bias-free-dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["o"], bias="all"),
}


@pytest.mark.parametrize("case", list(T5_CONFIGS))
def test_t5_layer_selection_and_bias_free_model_match_peft(case, tmp_path):
    ref = peft_saved("t5", T5_CONFIGS[case](), tmp_path / "peft")
    ours = base("t5")
    names = load_peft_adapter(ours, tmp_path / "peft")
    if case == "layers_to_transform":  # block 1 of the encoder and of the decoder (layer 1 of block 1 is the
        # decoder's cross-attention, which the lazy first-index match does not confuse with the block index)
        assert names and all(".block.1." in n for n in names)
    if case == "layers_pattern":
        assert names and all(".block.0." in n for n in names)
    assert_same(ours, ref, "t5")
    ours_dir = tmp_path / "ours"
    bias = T5_CONFIGS[case]().bias
    save_peft_adapter(ours, ours_dir, bias=bias)
    assert file_keys(ours_dir) == file_keys(tmp_path / "peft")  # T5 has no biases: the same file as bias="none"
    again = peft.PeftModel.from_pretrained(base("t5"), ours_dir).eval()
    with torch.no_grad():
        assert rel_err(again(**inputs("t5")).logits, ref(**inputs("t5")).logits) < TOL


# ---- QLoRA: a bitsandbytes 4-bit base ------------------------------------------------------------------------------

QLORA_TOL = 1e-5  # float32 (bitsandbytes' CPU compute dtype): the two sides differ in summation order only


def qlora_llama(quant_type: str, double_quant: bool):
    """A tiny Llama (hidden 64: a multiple of the 64-element quantisation blocks) whose decoder linears are
    bitsandbytes Linear4bit layers, prepared as peft's QLoRA recipe does (prepare_model_for_kbit_training)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    for name, linear in list(model.named_modules()):
        if isinstance(linear, torch.nn.Linear) and name != "lm_head":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                      compute_dtype=torch.float32, compress_statistics=double_quant,
                                      quant_type=quant_type)  # fmt: skip
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                             compress_statistics=double_quant, quant_type=quant_type)  # fmt: skip
            model.set_submodule(name, layer.to("cpu"))  # .to() quantises
    model.is_loaded_in_4bit = True
    return peft.prepare_model_for_kbit_training(model).eval()


QLORA_CASES = [("nf4", True, False), ("nf4", False, True), ("fp4", True, True), ("fp4", False, False)]


@pytest.mark.parametrize("quant_type, double_quant, use_dora", QLORA_CASES)
def test_qlora_adapter_loads_with_peft_numbers(quant_type, double_quant, use_dora, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora, target_modules=["q_proj", "v_proj", "down_proj"])
    ref = peft.get_peft_model(qlora_llama(quant_type, double_quant), config)
    assert type(ref.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # peft's bnb layer
    randomise(ref, 0)
    ref.save_pretrained(tmp_path)
    ours = qlora_llama(quant_type, double_quant)
    names = load_peft_adapter(ours, tmp_path)
    layer = ours.get_submodule(names[0])
    assert type(layer).__name__ == ("DoRALinear4bit" if use_dora else "LoRALinear4bit")
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.weight.dtype == torch.uint8  # still packed
    logits, grads = logits_and_grads(ours, "llama", peft_names=False)
    ref_logits, ref_grads = logits_and_grads(ref.eval(), "llama", peft_names=True)
    assert rel_err(logits, ref_logits) < QLORA_TOL
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 10 * QLORA_TOL, name
    save_peft_adapter(ours, tmp_path / "ours")  # and back: peft's QLoRA model loads ours
    again = peft.PeftModel.from_pretrained(qlora_llama(quant_type, double_quant), tmp_path / "ours").eval()
    assert rel_err(logits_and_grads(again, "llama", peft_names=True)[0], logits) < QLORA_TOL


def test_qlora_dora_row_norm_dequantises_a_block_of_rows_at_a_time(monkeypatch):
    """The norm equals the one from the whole dequantised weight, and no call ever dequantises more rows than a
    block (here 3 rows at a time, of 128)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from lowrank_kernels.modules import dora

    layer = qlora_llama("nf4", True).model.layers[0].mlp.up_proj  # [128, 64]
    A, B = torch.randn(4, 64), torch.randn(128, 4)
    full = bnb_f.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    expected = torch.linalg.norm(full.double() + 0.5 * (B.double() @ A.double()), dim=1)
    shapes = []
    dequantize = bnb_f.dequantize_4bit
    monkeypatch.setattr(bnb_f, "dequantize_4bit", lambda a, s, *args, **kw: shapes.append(tuple(s.shape))
                        or dequantize(a, s, *args, **kw))  # fmt: skip
    norm = dora.quantized_row_norm(layer, A, B, 0.5, torch.float32, block_elements=3 * 64)
    assert rel_err(norm, expected) < 1e-6
    assert shapes and max(s[0] for s in shapes) == 3 and sum(s[0] for s in shapes) == 128


def test_qlora_unsupported_paths_are_refused_clearly():
    from lowrank_kernels import inject_multi_lora

    model = qlora_llama("nf4", False)
    with pytest.raises(TypeError, match="a bitsandbytes 4-bit base is supported by LoRALinear and DoRALinear only"):
        inject_adapters(model, ["q_proj"], method="adalora")
    with pytest.raises(TypeError, match="serving adapters on a bitsandbytes 4-bit base is not supported"):
        inject_multi_lora(model, ["q_proj"], capacity=2, max_rank=2)
    assert not adapter_layers(model)
    layers = {n: model.get_submodule(n) for n in find_names(model, "q_proj")}
    names = inject_adapters(model, ["q_proj"])
    with pytest.raises(NotImplementedError, match="would re-quantise it"):
        model.get_submodule(names[0]).merge()
    remove_adapters(model)  # the bitsandbytes layers themselves come back
    assert all(model.get_submodule(n) is layer for n, layer in layers.items())


def find_names(model, leaf: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith(f".{leaf}")]
