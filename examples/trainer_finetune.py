"""Fine-tune a peft model with transformers' Trainer, on the fused kernels: one added line, ``patch_peft_model``.

The usual peft recipe (``get_peft_model`` + ``Trainer``) on a Llama built from a config (random weights, nothing
downloaded) learning to count tokens. The same run twice, from the same initial weights and data order: plain peft,
then patched. The patched run gives the same loss curve (within the dtype's rounding: 1e-3 relative in float32 over
the run, bf16 on a GPU is looser) and reports its step time beside peft's. ``--dora`` trains a DoRA adapter.

    python examples/trainer_finetune.py --tiny     # CPU, float32, seconds
    python examples/trainer_finetune.py            # GPU, bf16, a 4-layer 2048-wide model
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from common import build_llama, device_and_dtype
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from lowrank_kernels import patch_peft_model


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod vocab): a pattern a LoRA adapter learns in a few steps."""

    def __init__(self, vocab_size: int, n: int, seq: int):
        start = torch.randint(0, vocab_size, (n, 1), generator=torch.Generator().manual_seed(3))
        self.ids = (start + torch.arange(seq)) % vocab_size

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def finetune(args, patched: bool, output_dir: str) -> tuple[list[float], float, str]:
    """(loss per step, milliseconds per step, the patch report) of one Trainer run."""
    device, dtype = device_and_dtype(args.tiny)
    base = build_llama(args.tiny, device, dtype)
    config = LoraConfig(r=8, lora_alpha=16, use_dora=args.dora, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, config)
    report = ""
    if patched:
        report = str(patch_peft_model(model))  # <- the one line: every peft LoRA/DoRA layer now runs fused
    steps, batch, seq = (12, 4, 12) if args.tiny else (args.steps, 8, 512)
    training = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=device.type == "cpu", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=CountingTokens(base.config.vocab_size, steps * batch,
                                                                               seq))  # fmt: skip
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, 1e3 * result.metrics["train_runtime"] / steps, report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model, 12 steps (CPU, seconds)")
    parser.add_argument("--dora", action="store_true", help="a DoRA adapter instead of LoRA")
    parser.add_argument("--steps", type=int, default=50, help="training steps at full size")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        peft_losses, peft_ms, _ = finetune(args, False, f"{tmp}/peft")
        losses, ms, report = finetune(args, True, f"{tmp}/patched")
    max_rel_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, peft_losses, strict=True))
    print(report)
    print("| step | peft loss | patched loss |\n| --- | --- | --- |")
    for step in sorted({0, len(losses) // 2, len(losses) - 1}):
        print(f"| {step + 1} | {peft_losses[step]:.5f} | {losses[step]:.5f} |")
    print(
        f"max relative loss difference {max_rel_diff:.2e}; step time: peft {peft_ms:.1f} ms, patched {ms:.1f} ms "
        f"({'includes Triton compilation on the first steps' if torch.cuda.is_available() else 'CPU reference'})"
    )
    return {"losses": losses, "peft_losses": peft_losses, "max_rel_diff": max_rel_diff, "step_ms": ms,
            "peft_step_ms": peft_ms, "report": report}  # fmt: skip


if __name__ == "__main__":
    main()
