"""Per-token adapter ids and layers that see flattened tokens: OPT's fc1/fc2 ([tokens, hidden]), DeBERTa-v2's
relative-position attention, against peft running each sequence's adapter alone (peft 0.21.2, transformers 5.23)."""

import copy

import pytest
import torch
from helpers import REL_TOL, rel_err
from torch import nn

from lowrank_kernels import AdapterPool, MultiLoRALinear, load_peft_adapters_for_serving, serve_batch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = REL_TOL[torch.float32]


def save_peft_adapters(base, root, targets, specs):
    """peft adapters ``{name: (r, dora)}`` with random non-zero B, written by peft's own save_pretrained."""
    paths = {}
    for i, (name, (r, dora)) in enumerate(specs.items()):
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, use_dora=dora, target_modules=targets)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        paths[name] = str(root / name)
        model.save_pretrained(paths[name])
    return paths


def check_against_peft_per_sequence(base, paths, ids, inputs, logits_of):
    """The mixed batch (one id per sequence, None: the base model) against peft with that sequence's adapter."""
    served = copy.deepcopy(base)
    load_peft_adapters_for_serving(served, paths)
    with torch.no_grad(), serve_batch(served, ids):
        mixed = logits_of(served, inputs)
    for j, name in enumerate(ids):
        one = {k: v[j : j + 1] for k, v in inputs.items()}
        with torch.no_grad():
            if name is None:
                expected = logits_of(base, one)
            else:
                expected = logits_of(peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[name]).eval(), one)
        assert rel_err(mixed[j : j + 1], expected) < TOL, (j, name)
    return served


def tiny_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=32)  # fmt: skip
    return transformers.OPTForCausalLM(config).eval()


def test_opt_flattened_tokens_take_per_sequence_ids(tmp_path):
    """OPT's fc1/fc2 see [batch * seq, hidden]: per-sequence ids are expanded to the tokens, as the attention's
    [batch, seq, hidden] layers take them, and each sequence equals peft with its adapter alone."""
    base = tiny_opt()
    paths = save_peft_adapters(base, tmp_path, ["q_proj", "v_proj", "fc1", "fc2"],
                               {"a": (4, False), "b": (8, False), "d": (4, True)})  # fmt: skip
    tokens = torch.randint(0, 64, (5, 7), generator=torch.Generator().manual_seed(1))
    check_against_peft_per_sequence(base, paths, ["b", None, "a", "d", "b"], {"input_ids": tokens},
                                    lambda m, kw: m(**kw).logits)  # fmt: skip


def test_per_token_ids_as_vllm_takes_them(tmp_path):
    """One id per token (a [batch, seq] tensor of slots, or a flat list) gives what one id per sequence gives, and
    tokens of one sequence may name different adapters: each token row gets its own."""
    base = tiny_opt()
    paths = save_peft_adapters(base, tmp_path, ["q_proj", "v_proj", "fc1", "fc2"], {"a": (4, False), "b": (8, False)})
    served = copy.deepcopy(base)
    load_peft_adapters_for_serving(served, paths)
    tokens = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(2))
    layer = served.model.decoder.layers[0].fc1
    slot = {n: layer.pool.slot(n) for n in ("a", "b")}
    per_seq = ["a", "b", None]
    per_token = torch.tensor([[slot["a"]] * 6, [slot["b"]] * 6, [-1] * 6])
    with torch.no_grad():
        with serve_batch(served, per_seq):
            want = served(tokens).logits
        with serve_batch(served, per_token):
            got = served(tokens).logits
        with serve_batch(served, per_token.reshape(-1).tolist()):
            flat = served(tokens).logits
    assert rel_err(got, want) < TOL and rel_err(flat, want) < TOL
    # Token-level mixing inside one layer: rows of one [tokens, K] input, each its own adapter.
    pool_layer = MultiLoRALinear.from_linear(nn.Linear(16, 8), capacity=2, max_rank=4)
    g = torch.Generator().manual_seed(3)
    for name in ("x", "y"):
        pool_layer.add_adapter(name, torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 8.0)
    x = torch.randn(2, 3, 16, generator=g)
    token_ids = torch.tensor([[0, 1, -1], [1, 1, 0]])
    with torch.no_grad():
        y = pool_layer(x, token_ids)
        for t, a in enumerate(token_ids.reshape(-1).tolist()):
            row = x.reshape(-1, 16)[t : t + 1]
            assert rel_err(y.reshape(-1, 8)[t : t + 1], pool_layer(row, [a])) < TOL


def tiny_deberta(share_att_key: bool):
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64, relative_attention=True,
                                          pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=share_att_key,
                                          num_labels=3, type_vocab_size=0)  # fmt: skip
    return transformers.DebertaV2ForSequenceClassification(config).eval()


def test_deberta_v2_relative_attention_mixed_batch(tmp_path):
    """DeBERTa-v2 with relative attention (separate position projections): a mixed batch equals peft per sequence."""
    base = tiny_deberta(share_att_key=False)
    paths = save_peft_adapters(base, tmp_path, ["query_proj", "key_proj", "value_proj", "dense"],
                               {"a": (4, False), "b": (2, False)})  # fmt: skip
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(4))
    check_against_peft_per_sequence(base, paths, ["a", "b", None, "a"], {"input_ids": tokens},
                                    lambda m, kw: m(**kw).logits)  # fmt: skip


def test_deberta_v3_shared_position_projection(tmp_path):
    """DeBERTa-v3 (share_att_key): query_proj/key_proj also project the relative-position embeddings, rows shared by
    every sequence. One adapter for the whole batch is served exactly; different adapters are refused in words."""
    base = tiny_deberta(share_att_key=True)
    paths = save_peft_adapters(base, tmp_path, ["query_proj", "key_proj", "value_proj"],
                               {"a": (4, False), "b": (2, False)})  # fmt: skip
    tokens = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(5))
    check_against_peft_per_sequence(base, paths, ["b", "b", "b"], {"input_ids": tokens},
                                    lambda m, kw: m(**kw).logits)  # fmt: skip
    served = copy.deepcopy(base)
    load_peft_adapters_for_serving(served, paths)
    with pytest.raises(ValueError, match="shared by every request"):
        with torch.no_grad(), serve_batch(served, ["a", "b", None]):
            served(tokens)


def test_ids_that_fit_no_layout_are_refused():
    pool_layer = MultiLoRALinear.from_linear(nn.Linear(16, 8), capacity=1, max_rank=2)
    pool_layer.add_adapter("x", torch.randn(2, 16), torch.randn(8, 2), 2.0)
    assert isinstance(pool_layer.pool, AdapterPool)
    with pytest.raises(ValueError, match="one id per row"):
        pool_layer(torch.randn(7, 16), [0, 0, 0])
