"""Load a peft LoRA / DoRA adapter into our layers, check the numbers agree with peft, and time both.

The "trained" peft adapter is made here (random adapter weights on a transformers Llama built from a config; nothing
is downloaded) and saved with ``save_pretrained``, exactly as a real adapter directory would be. Then
``load_peft_adapter`` wraps a fresh copy of the same base model with our layers and loads it, and the script prints
the largest logit difference and the forward / forward+backward times of both.

    python examples/convert_peft_adapter.py --tiny            # CPU, seconds
    python examples/convert_peft_adapter.py --dora            # GPU, bf16, a 4-layer 2048-wide model
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from common import build_llama, device_and_dtype, timed
from peft import LoraConfig, PeftModel, get_peft_model

from lowrank_kernels import load_peft_adapter, save_peft_adapter


def make_peft_adapter(base, path: str, r: int, dora: bool) -> PeftModel:
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=dora, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # a "trained" adapter: LoRA's initial B = 0 would make the comparison trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.save_pretrained(path)
    return model


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model (CPU, seconds)")
    parser.add_argument("--dora", action="store_true", help="a DoRA adapter (use_dora=True) instead of LoRA")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.tiny)
    batch, seq = (2, 16) if args.tiny else (4, 1024)

    base = build_llama(args.tiny, device, dtype)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    with tempfile.TemporaryDirectory() as path:
        theirs = make_peft_adapter(base, path, args.rank, args.dora)
        ours = copy.deepcopy(base)
        wrapped = load_peft_adapter(ours, path)
        # ... and back: our adapter saved in peft's format loads into peft with the same numbers
        save_peft_adapter(ours, f"{path}/ours")
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), f"{path}/ours")

    with torch.no_grad():
        want = theirs(ids, use_cache=False).logits.float()
        got = ours(ids, use_cache=False).logits.float()
        back = reloaded(ids, use_cache=False).logits.float()
    scale = want.abs().max().item()
    result = {"max_diff": (got - want).abs().max().item() / scale, "max_diff_back": (back - want).abs().max().item()}
    print(f"{'DoRA' if args.dora else 'LoRA'} r={args.rank}: {len(wrapped)} layers wrapped on {device} ({dtype})")
    print(f"max |ours - peft| / max |peft| = {result['max_diff']:.2e}; our saved adapter in peft: "
          f"{result['max_diff_back'] / scale:.2e}")  # fmt: skip

    def forward(model):
        def run():
            with torch.no_grad():
                model(ids, use_cache=False)

        return run

    def train_step(model):
        def run():
            model(ids, use_cache=False).logits.float().square().mean().backward()

        return run

    repeats = 5 if args.tiny else 20
    print("\n| pass | peft (ms) | lowrank_kernels (ms) | speed-up |\n|---|---|---|---|")
    for label, make in (("forward", forward), ("forward+backward", train_step)):
        t_peft, t_ours = timed(make(theirs), device, repeats), timed(make(ours), device, repeats)
        result[label] = t_peft / t_ours
        print(f"| {label} | {t_peft:.2f} | {t_ours:.2f} | {t_peft / t_ours:.2f}x |")
    return result


if __name__ == "__main__":
    main()
