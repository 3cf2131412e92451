"""peft's mixed batch (``model(ids, adapter_names=[...])``, ``generate(..., adapter_names=...)``) on a patched model:
one multi-adapter gather call (``multi_lora_linear``) per layer over the adapters the batch names, with peft's logits,
tokens and adapter gradients (float64: 1e-10 relative), and peft's refusals where peft refuses."""

import copy
import math

import pytest
import test_peft_patch
import torch
from helpers import REL_TOL, rel_err, tiny_llama
from test_peft_patch import (
    NUM_LAYERS_ALL_LINEAR,
    TOL,
    VOCAB,
    assert_same,
    logits_and_grads,
    lora_config,
    peft_llama,
    token_batch,
)
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lowrank_kernels.models import peft_patch  # noqa: E402
from lowrank_kernels.models.peft_patch import patch_peft_model, unpatch_peft_model  # noqa: E402
from lowrank_kernels.ops.multi_lora import naive as multi_naive  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
fused_calls = test_peft_patch.fused_calls  # the fixture counting lora_linear / dora_linear / multi_lora_linear calls

# Three adapters of different ranks and scales (rsLoRA among them), "__base__" rows, in mixed order.
NAMES = ["wide", "__base__", "default", "narrow", "wide", "default"]


def three_adapter_llama(**overrides):
    model = peft_llama(**overrides)  # "default": r=4, alpha 8
    model.add_adapter("narrow", lora_config("lora", r=2, lora_alpha=3, **overrides))
    model.add_adapter("wide", lora_config("rslora", r=8, lora_alpha=5, **overrides))
    model.eval()  # peft refuses adapter_names in training mode
    return model


@pytest.fixture
def shrink_calls(monkeypatch):
    """Counts the CPU implementation's segment_shrink launches: the op the patch calls really ran the gather path."""
    calls = []
    shrink = multi_naive.segment_shrink

    def counting(x, a, meta, **kwargs):
        calls.append((tuple(x.shape), tuple(a.shape)))
        return shrink(x, a, meta, **kwargs)

    monkeypatch.setattr(multi_naive, "segment_shrink", counting)
    return calls


def test_three_ranks_and_base_rows_equal_peft_on_one_gather_call_per_layer(fused_calls, shrink_calls):
    model = three_adapter_llama()
    ids = token_batch(batch=len(NAMES))
    expected = logits_and_grads(model, ids, adapter_names=NAMES)  # eval mode, but the adapters require grad
    expected_tokens = model.generate(ids, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
    patch_peft_model(model)
    peft_patch._BATCHES.clear()
    assert_same(logits_and_grads(model, ids, adapter_names=NAMES), expected)
    assert fused_calls["multi"] == NUM_LAYERS_ALL_LINEAR and fused_calls["lora"] == 0  # no per-adapter groups
    # forward and backward shrinks over the three adapters stacked at rank 8: [3, 8, K] (dy B^T: [3, 8, N])
    assert len(shrink_calls) == 2 * NUM_LAYERS_ALL_LINEAR
    assert all(a[:2] == (3, 8) and x[0] == len(NAMES) * ids.shape[1] for x, a in shrink_calls)
    # the layers of one forward share the row metadata: one batch per distinct out_features (32, 16, 64)
    assert len(peft_patch._BATCHES) == 3
    tokens = model.generate(ids, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, expected_tokens)
    assert fused_calls["lora"] == 0


def test_the_slots_follow_the_names_not_the_order_of_first_use(fused_calls):
    """Every permutation of the same rows: a slot assignment that followed anything but the row's name would
    give one row another adapter's term."""
    model = three_adapter_llama()
    ids = token_batch(batch=4, seed=3)
    orders = [["narrow", "wide", "__base__", "default"], ["default", "__base__", "wide", "narrow"],
              ["wide", "wide", "narrow", "narrow"]]  # fmt: skip
    with torch.no_grad():
        expected = [model(ids, adapter_names=names).logits for names in orders]
        patch_peft_model(model)
        for names, want in zip(orders, expected, strict=True):
            assert rel_err(model(ids, adapter_names=names).logits, want) < TOL
    assert fused_calls["multi"] == len(orders) * NUM_LAYERS_ALL_LINEAR


def test_an_in_place_update_of_a_peft_weight_is_seen_by_the_next_call(fused_calls):
    model = three_adapter_llama()
    ids = token_batch(batch=len(NAMES))
    patch_peft_model(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        before = model(ids, adapter_names=NAMES).logits
        q.lora_B["narrow"].weight.mul_(3.0)  # an optimizer step's kind of update (bumps _version) ...
        q.lora_A["wide"].weight.data.add_(0.5)  # ... and one through .data (does not)
        q.scaling["default"] *= 2  # peft's set_scale / scale_layer
        after = model(ids, adapter_names=NAMES).logits
        unpatch_peft_model(model)
        expected = model(ids, adapter_names=NAMES).logits
    assert rel_err(after, before) > 1e-3 and rel_err(after, expected) < TOL


def test_generate_and_logits_with_a_dora_adapter_beside_and_peft_refusal_of_dora_in_the_batch(fused_calls):
    model = three_adapter_llama()
    model.add_adapter("dora", lora_config("dora", r=2, lora_alpha=4))
    model.eval()
    ids = token_batch(batch=len(NAMES))
    expected = logits_and_grads(model, ids, adapter_names=NAMES)  # peft: DoRA present, not named: allowed
    with pytest.raises(ValueError) as peft_error:
        model(ids, adapter_names=["dora", *NAMES[1:]])
    patch_peft_model(model)
    assert_same(logits_and_grads(model, ids, adapter_names=NAMES), expected)
    assert fused_calls["multi"] == NUM_LAYERS_ALL_LINEAR
    with pytest.raises(ValueError) as ours:
        model(ids, adapter_names=["dora", *NAMES[1:]])
    assert str(ours.value) == str(peft_error.value) == "Cannot pass `adapter_names` when DoRA is enabled."


def test_adalora_mixed_batches_fail_as_in_peft(fused_calls):
    """peft's AdaLoRA layer (SVDLinear) has no mixed-batch forward: it hands adapter_names to the base layer."""
    model = peft_llama("adalora")
    model.eval()
    ids = token_batch(batch=2)
    with pytest.raises(TypeError) as peft_error:
        model(ids, adapter_names=["default", "__base__"])
    patch_peft_model(model)
    with pytest.raises(TypeError) as ours:
        model(ids, adapter_names=["default", "__base__"])
    assert str(ours.value) == str(peft_error.value)
    assert fused_calls["multi"] == fused_calls["lora"] == 0


def gpt2(dora=False):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    targets = ["c_attn", "c_proj", "c_fc"]
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config).double(),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True,
                                                init_lora_weights=False))  # fmt: skip
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"],
                                               fan_in_fan_out=True, init_lora_weights=False))  # fmt: skip
    return model.eval()


def test_gpt2_conv1d_mixed_batch_reads_the_conv1d_weights_themselves(fused_calls):
    model = gpt2()
    ids = token_batch(batch=4)
    names = ["other", "default", "__base__", "other"]  # "other" is not on c_proj: those rows get the base there
    expected = logits_and_grads(model, ids, adapter_names=names)
    expected_tokens = model.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False)
    patch_peft_model(model)
    assert_same(logits_and_grads(model, ids, adapter_names=names), expected)
    assert fused_calls["multi"] == 8 and fused_calls["lora"] == 0
    conv1d_weights = {m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "Conv1D"}
    assert set(fused_calls["weight_ptrs"]) == conv1d_weights  # W0^T as a view: no copy of the base weight
    assert torch.equal(model.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False), expected_tokens)


def test_opt_flattened_token_layers_fail_as_in_peft_and_the_rest_runs_gathered(fused_calls):
    """OPT's fc1/fc2 see [batch * seq, hidden]: peft's length check refuses per-sequence names there; on the
    attention projections ([batch, seq, hidden]) the mixed batch runs, on the gather op."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=32)  # fmt: skip
    base = transformers.OPTForCausalLM(config).double()
    ids, names = token_batch(batch=3), ["b", "__base__", "default"]
    models = {}
    for targets in (["q_proj", "v_proj"], ["q_proj", "fc1"]):
        model = peft.get_peft_model(copy.deepcopy(base), lora_config("lora", target_modules=targets))
        model.add_adapter("b", lora_config("lora", r=2, lora_alpha=5, target_modules=targets))
        models[tuple(targets)] = model.eval()
    attention = models[("q_proj", "v_proj")]
    expected = logits_and_grads(attention, ids, adapter_names=names)
    patch_peft_model(attention)
    assert_same(logits_and_grads(attention, ids, adapter_names=names), expected)
    assert fused_calls["multi"] == 4
    flattened = models[("q_proj", "fc1")]
    with pytest.raises(ValueError) as peft_error:
        flattened(ids, adapter_names=names)
    patch_peft_model(flattened)
    with pytest.raises(ValueError) as ours:
        flattened(ids, adapter_names=names)
    assert str(ours.value) == str(peft_error.value) and "Length of `adapter_names`" in str(ours.value)


def test_float32_adapters_on_a_bfloat16_base_in_a_mixed_batch_are_as_accurate_as_peft(fused_calls):
    model = peft.get_peft_model(tiny_llama(VOCAB).to(torch.bfloat16), lora_config("lora"))
    model.add_adapter("narrow", lora_config("lora", r=2, lora_alpha=3))
    model.eval()
    ids = token_batch(batch=4)
    names = ["narrow", "default", "__base__", "narrow"]
    exact = logits_and_grads(copy.deepcopy(model).double(), ids, adapter_names=names)
    expected = logits_and_grads(model, ids, adapter_names=names)
    patch_peft_model(model)
    logits, grads = logits_and_grads(model, ids, adapter_names=names)
    assert fused_calls["multi"] == NUM_LAYERS_ALL_LINEAR and fused_calls["lora"] == 0
    bound = REL_TOL[torch.bfloat16]
    assert rel_err(logits, exact[0]) < max(2 * rel_err(expected[0], exact[0]), bound)
    assert grads.keys() == exact[1].keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert rel_err(g, exact[1][name]) < max(2 * rel_err(expected[1][name], exact[1][name]), bound), name


def peft_layer(dropout=0.0):
    torch.manual_seed(0)
    config = peft.LoraConfig(lora_dropout=dropout, init_lora_weights=False)
    layer = peft.tuners.lora.layer.Linear(nn.Linear(8, 6).double(), "a", config=config, r=2, lora_alpha=4)
    layer.update_layer("b", r=3, lora_alpha=5, config=config)
    layer.base_layer.requires_grad_(False)  # frozen, as get_peft_model leaves it
    return layer.double()


def test_a_layer_called_with_dropout_in_training_keeps_one_fused_call_per_adapter(fused_calls):
    """peft's model refuses adapter_names in training mode; a layer called directly applies each adapter's dropout,
    which the gather op (one mask for every row) does not: the per-adapter groups run, as before; in eval the
    gather op, with peft's numbers."""
    layer = peft_layer(dropout=0.3)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    names = ["b", "__base__", "a", "b"]
    layer.eval()
    expected = layer(x, adapter_names=names)
    peft_patch.patch_peft_model(layer)
    assert rel_err(layer(x, adapter_names=names), expected) < TOL and fused_calls["multi"] == 1
    layer.train()
    out = layer(x, adapter_names=names)
    assert fused_calls["multi"] == 1 and fused_calls["lora"] == 2  # one per adapter
    assert torch.equal(out[1], expected[1])  # the base row has no dropout
    assert rel_err(out, expected) > 1e-4  # the masks were applied


def test_a_trainable_base_layer_in_a_mixed_batch_gets_peft_gradients(fused_calls):
    """The gather op keeps W0 frozen; should a caller train it, the per-adapter groups run (lora_linear's plain
    W0 gradient)."""
    layer = peft_layer()
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(4, 3, 8, dtype=torch.float64)
    names = ["a", "b", "__base__", "a"]
    dy = torch.randn(4, 3, 6, dtype=torch.float64)

    def run():
        layer.zero_grad(set_to_none=True)
        (layer(x, adapter_names=names) * dy).sum().backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    expected = run()
    peft_patch.patch_peft_model(layer)
    grads = run()
    assert fused_calls["multi"] == 0 and fused_calls["lora"] == 2
    assert grads.keys() == expected.keys() and "base_layer.weight" in grads
    for name, g in grads.items():
        assert rel_err(g, expected[name]) < TOL, name
    layer.base_layer.weight.requires_grad_(False)
    grads = run()
    assert fused_calls["multi"] == 1 and fused_calls["lora"] == 2
    for name, g in grads.items():
        assert rel_err(g, expected[name]) < TOL, name


@pytest.mark.parametrize("rank", [1, 2, 3, 7, 8, 12, 16, 64])
def test_every_peft_scaling_is_matched(rank):
    """The batch's per-row scale is alpha / rank: the alpha chosen gives peft's lora_alpha / r back to the bit, and
    any other scaling (rsLoRA, set_scale) to the bit or within one ulp."""
    for alpha in range(1, 65):
        assert peft_patch._slot_alpha(alpha / rank, rank) / rank == alpha / rank
    g = torch.Generator().manual_seed(rank)
    for scale in [*torch.rand(300, generator=g, dtype=torch.float64).mul(16).tolist(), 0.1, 1 / 3, 2.0, 0.0]:
        got = peft_patch._slot_alpha(scale, rank) / rank
        assert got == scale or abs(got - scale) <= math.ulp(scale)
