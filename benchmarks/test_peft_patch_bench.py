"""A peft user's training step, unpatched vs ``patch_peft_model``: the one-line switch, timed end to end (GPU).

    pytest benchmarks/test_peft_patch_bench.py --benchmark-only --benchmark-json=peft.json
    python benchmarks/report.py peft.json

A small Llama from a config (2 layers, hidden 2048, MLP 5632, bf16, batch 4 x 512 tokens) under peft's LoRA and DoRA
on every linear layer (r = 16). One step is forward, loss, backward and an AdamW step of the adapters; the row is
the ``do_bench`` median of that step, the patched model's beside the unpatched one's from the same process and the
same weights (``ratio`` < 1: the patch is faster). Before timing, the patched model's loss is checked against
peft's (bf16 tolerance).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_lora_bench import _do_bench_us, _ratio, _record, _us  # noqa: E402  one protocol for every row

HAS_STACK = all(importlib.util.find_spec(m) is not None for m in ("peft", "transformers"))
pytestmark = pytest.mark.skipif(not HAS_STACK, reason="needs peft and transformers")
BATCH, SEQ = 4, 512
_TIMES: dict[str, float] = {}


def _model(method: str, device="cuda", dtype=torch.bfloat16, hidden=2048, mlp=5632, heads=16, vocab=8192):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=SEQ)  # fmt: skip
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=method == "dora")
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a nonzero B makes the adapter term count
            torch.nn.init.normal_(p, std=0.02)
    return model


def _step(model, optimizer, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("provider", ["peft", "patched"])
def test_peft_train_step(benchmark, bench_env, method, provider):
    import lowrank_kernels as lk

    model = _model(method)
    ids = torch.randint(0, 8192, (BATCH, SEQ), device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.float()
    report = None
    if provider == "patched":
        report = lk.patch_peft_model(model)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.float()
        assert abs(loss - reference) <= 2e-2 * abs(reference), (loss.item(), reference.item())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    median_us = _do_bench_us(_step(model, optimizer, ids))
    _TIMES[f"{method}-{provider}"] = median_us
    peft_us = _TIMES.get(f"{method}-peft")
    info = {"kind": "peft_train", "op": method, "shape": "llama-2x2048", "M": BATCH * SEQ, "provider": provider,
            "median_us": _us(median_us), "peft_us": None if peft_us is None else _us(peft_us),
            "ratio": _ratio(median_us, peft_us) if provider == "patched" else None,
            "patched_layers": None if report is None else len(report.patched),
            "unpatched_layers": None if report is None else len(report.unpatched)}  # fmt: skip
    _record(benchmark, bench_env, f"peft_train-{method}-{provider}", info, _step(model, optimizer, ids))
