"""Serve one batch whose sequences each use a different adapter (or none), from peft adapter directories.

Four peft adapters for the same base Llama (different ranks, one rsLoRA, one DoRA; random weights, saved with
``save_pretrained``; nothing is downloaded) are loaded into the ``MultiLoRALinear`` pools of one model with
``load_peft_adapters_for_serving``. A batch names an adapter per sequence; ``serve_batch`` sets it once for every
layer. The script checks each sequence against peft running that adapter alone, then times the mixed batch against
the base model alone and against peft's own mixed-batch forward (``adapter_names=``, LoRA adapters only: peft does
not batch DoRA adapters).

    python examples/serve_mixed_batch.py --tiny     # CPU, seconds
    python examples/serve_mixed_batch.py            # GPU, bf16, a 4-layer 2048-wide model, 32 sequences
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from common import build_llama, device_and_dtype, timed
from peft import LoraConfig, PeftModel, get_peft_model

from lowrank_kernels import load_peft_adapters_for_serving, serve_batch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (r, use_rslora, use_dora)
    "sql": (16, False, False),
    "chat": (8, True, False),
    "code": (32, False, False),
    "dora": (8, False, True),
}


def save_adapters(base, root: str) -> dict[str, str]:
    paths = {}
    for i, (name, (r, rslora, dora)) in enumerate(ADAPTERS.items()):
        config = LoraConfig(r=r, lora_alpha=2 * r, use_rslora=rslora, use_dora=dora, target_modules=TARGETS)
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths[name] = f"{root}/{name}"
        model.save_pretrained(paths[name])
    return paths


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model, 8 sequences (CPU, seconds)")
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.tiny)
    n_seq, seq = (8, 12) if args.tiny else (32, 256)

    base = build_llama(args.tiny, device, dtype).eval()
    names = [*ADAPTERS, None]
    batch_ids = [names[i % len(names)] for i in range(n_seq)]  # every adapter, and base-only sequences
    tokens = torch.randint(0, base.config.vocab_size, (n_seq, seq), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)

    with tempfile.TemporaryDirectory() as root:
        paths = save_adapters(base, root)
        served = copy.deepcopy(base)
        load_peft_adapters_for_serving(served, paths)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), paths["sql"], adapter_name="sql")
        for name in list(ADAPTERS)[1:]:
            peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()

    with torch.no_grad(), serve_batch(served, batch_ids):
        logits = served(tokens, use_cache=False).logits.float()
    worst = 0.0
    with torch.no_grad():
        for i, name in enumerate(batch_ids):
            if name is None:
                with peft_model.disable_adapter():
                    want = peft_model(tokens[i : i + 1], use_cache=False).logits.float()
            else:
                peft_model.set_adapter(name)
                want = peft_model(tokens[i : i + 1], use_cache=False).logits.float()
            worst = max(worst, ((logits[i : i + 1] - want).abs().max() / want.abs().max()).item())
    print(f"{n_seq} sequences over {len(ADAPTERS)} adapters + base on {device} ({dtype}): "
          f"max relative difference to peft run per adapter = {worst:.2e}")  # fmt: skip

    lora_only = [n if n != "dora" else None for n in batch_ids]
    peft_names = [n if n is not None else "__base__" for n in lora_only]

    def run_base():
        with torch.no_grad():
            base(tokens, use_cache=False)

    def run_ours():
        with torch.no_grad(), serve_batch(served, lora_only):
            served(tokens, use_cache=False)

    def run_peft():
        with torch.no_grad():
            peft_model(tokens, use_cache=False, adapter_names=peft_names)

    repeats = 3 if args.tiny else 20
    t_base, t_ours, t_peft = (timed(f, device, repeats) for f in (run_base, run_ours, run_peft))
    print("\nLoRA adapters mixed in one batch (the DoRA sequences run base-only here, as peft cannot batch DoRA)")
    print("| model | ms | / base |\n|---|---|---|")
    for label, t in (("base model alone", t_base), ("lowrank_kernels", t_ours), ("peft adapter_names", t_peft)):
        print(f"| {label} | {t:.2f} | {t / t_base:.2f} |")
    return {"max_diff": worst, "ours_over_base": t_ours / t_base, "peft_over_base": t_peft / t_base}


if __name__ == "__main__":
    main()
