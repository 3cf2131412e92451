"""Fine-tune three jobs at once over one frozen base: one mixed batch per step, one optimizer, three peft adapters.

Three small jobs share a base Llama (random weights, nothing downloaded): each learns its own token mapping
(``next = (token + shift) % vocab``), with its own rank and kind: ``shift1`` LoRA r=8 trained with DyLoRA-style rank
sampling (a random active rank per sequence), ``shift2`` rsLoRA r=4, ``shift3`` DoRA r=8. Every ``nn.Linear`` of the
attention and MLP becomes a ``MultiLoRALinear`` with a trainable pool (``trainable=True``: the stacked ``lora_A``,
``lora_B`` and DoRA magnitudes are parameters). Each step draws sequences of all three jobs into one batch,
``train_batch(model, ids, ranks=...)`` names each sequence's adapter, and one backward trains all three: the
gather matmul's backward gives each adapter the gradient of its own rows only.

Then each job is written as a peft adapter (``save_peft_adapter(model, dir, adapter_name=job)``), loaded back by
peft alone (``PeftModel.from_pretrained``: equal logits), and the three are served together in one mixed batch
(``load_peft_adapters_for_serving`` + ``serve_batch``).

    python examples/multi_job_finetune.py --tiny     # CPU, seconds
    python examples/multi_job_finetune.py            # GPU, bf16, a 4-layer 2048-wide model
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile

import torch
from common import build_llama, device_and_dtype
from peft import PeftModel
from torch import nn

from lowrank_kernels import (
    MultiLoRALinear,
    load_peft_adapters_for_serving,
    multi_lora_layers,
    save_peft_adapter,
    serve_batch,
    train_batch,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
JOBS = {  # name: (shift, r, rslora, dora)
    "shift1": (1, 8, False, False),
    "shift2": (2, 4, True, False),
    "shift3": (3, 8, False, True),
}
MAX_RANK = 8


def make_trainable(model: nn.Module, *, dropout: float) -> None:
    """Replace every target nn.Linear with a MultiLoRALinear whose pool trains, and load each job's fresh adapter
    (peft's init: kaiming-uniform A, zero B; DoRA's magnitude the base's row norm), alpha = 2 r."""
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS):
            continue
        layer = MultiLoRALinear.from_linear(module, len(JOBS), MAX_RANK, trainable=True, dropout=dropout)
        for job, (_, r, rslora, dora) in JOBS.items():
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
            A = (torch.rand(r, module.in_features, generator=g) * 2 - 1) * bound
            B = torch.zeros(module.out_features, r)
            m = module.weight.detach().float().norm(dim=1) if dora else None
            layer.add_adapter(job, A, B, alpha=2 * r, magnitude=m, rslora=rslora)
        model.set_submodule(name, layer)


def job_batch(job: str, n: int, seq: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n sequences of job ``job``: random first token, then each token the previous plus the job's shift."""
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    tokens = (start + JOBS[job][0] * torch.arange(seq)) % vocab
    return tokens, tokens.clone()


def job_losses(model, vocab: int, seq: int, device) -> dict[str, float]:
    gen = torch.Generator().manual_seed(123)
    out = {}
    with torch.no_grad():
        for job in JOBS:
            tokens, labels = job_batch(job, 4, seq, vocab, gen)
            with serve_batch(model, [job] * 4):
                out[job] = model(tokens.to(device), labels=labels.to(device)).loss.item()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model, a few dozen steps (CPU, seconds)")
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.tiny)
    steps, per_job, seq = (20, 3, 10) if args.tiny else (200, 16, 128)

    base = build_llama(args.tiny, device, dtype)
    pristine = copy.deepcopy(base).eval()  # for peft and serving afterwards
    vocab = base.config.vocab_size
    model = base
    make_trainable(model, dropout=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    before = job_losses(model.eval(), vocab, seq, device)

    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        parts = [job_batch(job, per_job, seq, vocab, gen) for job in JOBS]
        tokens = torch.cat([t for t, _ in parts]).to(device)
        labels = torch.cat([lbl for _, lbl in parts]).to(device)
        ids = [job for job in JOBS for _ in range(per_job)]
        # DyLoRA-style: job shift1 trains a random active rank per sequence (its scale alpha / b), the others full.
        ranks = [int(torch.randint(1, JOBS[j][1] + 1, (), generator=gen)) if j == "shift1" else None for j in ids]
        perm = torch.randperm(len(ids), generator=gen)  # jobs interleaved in the batch: the ids need no order
        with train_batch(model, [ids[i] for i in perm], ranks=[ranks[i] for i in perm]):
            loss = model(tokens[perm], labels=labels[perm]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = job_losses(model.eval(), vocab, seq, device)

    results: dict = {"before": before, "after": after, "layers": len(multi_lora_layers(model))}
    with tempfile.TemporaryDirectory() as root:
        paths = {}
        for job in JOBS:
            paths[job] = f"{root}/{job}"
            save_peft_adapter(model, paths[job], adapter_name=job)
        # peft alone, each adapter: the logits of the trained pool for that job's sequences.
        tokens, _ = job_batch("shift1", 2, seq, vocab, torch.Generator().manual_seed(9))
        tokens = tokens.to(device)
        peft_diff = 0.0
        for job, path in paths.items():
            peft_model = PeftModel.from_pretrained(copy.deepcopy(pristine), path).eval()
            with torch.no_grad(), serve_batch(model, [job] * 2):
                ours = model(tokens).logits
            with torch.no_grad():
                theirs = peft_model(tokens).logits
            peft_diff = max(peft_diff, (ours - theirs).abs().max().item())
        # All three served together from their peft directories, one mixed batch.
        served = copy.deepcopy(pristine)
        load_peft_adapters_for_serving(served, paths)
        mixed_ids = ["shift3", None, "shift1", "shift2", "shift1", "shift3"]
        mixed = tokens[[0, 1, 0, 1, 1, 0]]
        with torch.no_grad(), serve_batch(served, mixed_ids):
            logits = served(mixed).logits
        serve_diff = 0.0
        for row, job in enumerate(mixed_ids):
            with torch.no_grad():
                if job is None:
                    alone = pristine(mixed[row : row + 1]).logits
                else:
                    with serve_batch(model, [job]):
                        alone = model(mixed[row : row + 1]).logits
            serve_diff = max(serve_diff, (logits[row : row + 1] - alone).abs().max().item())
    results.update(peft_max_diff=peft_diff, serve_max_diff=serve_diff)

    print("| job | kind | r | loss before | loss after |")
    print("|---|---|---|---|---|")
    for job, (_, r, rslora, dora) in JOBS.items():
        kind = "DoRA" if dora else "rsLoRA" if rslora else "LoRA (rank sampling)"
        print(f"| {job} | {kind} | {r} | {before[job]:.3f} | {after[job]:.3f} |")
    print(f"saved adapters vs peft.PeftModel: max |logit diff| {peft_diff:.2e}")
    print(f"mixed serving batch vs each alone: max |logit diff| {serve_diff:.2e}")
    return results


if __name__ == "__main__":
    main()
