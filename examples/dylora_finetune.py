"""DyLoRA fine-tuning of a transformers Llama, then evaluation of the one adapter at several ranks.

The base model has random weights (nothing is downloaded). The target model is the base plus a hidden low-rank change
of every attention and MLP projection, with decaying singular values, so a rank-``b`` adapter can recover its best
rank-``b`` part. Two adapters are trained to match the target's next-token distribution (KL divergence):

* LoRA at its full rank ``r``;
* DyLoRA: the same adapter with a rank ``b ~ U[1, r]`` sampled every step (``RankSampler``).

Both are then evaluated truncated to ``b = 1, 2, 4, ..., r`` (``set_model_rank``): LoRA is good only at ``r``,
DyLoRA at every rank. ``--tiny`` runs in seconds on a CPU; without it, on a GPU, it fine-tunes a 4-layer, 1024-wide
model in bf16 through the Triton kernels.

    python examples/dylora_finetune.py --tiny
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import build_llama, device_and_dtype
from torch import nn

from lowrank_kernels import RankSampler, set_model_rank
from lowrank_kernels.models.inject import find_target_modules, inject_adapters

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@torch.no_grad()
def make_target(base: nn.Module, r: int, decay: float = 0.6) -> nn.Module:
    """The base plus, on each targeted projection, ``U diag(s) V^T`` with ``s_i = top * decay**i`` (rank ``r``)."""
    target = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    for name in find_target_modules(target, TARGETS):
        w = target.get_submodule(name).weight
        u, _ = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g))
        v, _ = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g))
        s = 2.0 * w.float().norm(dim=1).mean() * decay ** torch.arange(r, dtype=torch.float32)
        w += ((u * s) @ v.t()).to(w)
    return target


def kl(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    return nn.functional.kl_div(student_logits.float().log_softmax(-1), target_logits.float().log_softmax(-1),
                                log_target=True, reduction="batchmean")  # fmt: skip


def train(model, target, r, sampler, steps, batch, seq, vocab, device) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(2)
    start = time.perf_counter()
    for _ in range(steps):
        set_model_rank(model, r) if sampler is None else sampler.apply(model)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        with torch.no_grad():
            want = target(ids, use_cache=False).logits
        loss = kl(model(ids, use_cache=False).logits, want)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, target, ranks, batch, seq, vocab, device) -> dict[int, float]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    want = target(ids, use_cache=False).logits
    out = {}
    for b in ranks:
        set_model_rank(model, b)
        out[b] = kl(model(ids, use_cache=False).logits, want).item()
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small model and few steps (CPU, seconds)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.tiny)
    steps = args.steps or (300 if args.tiny else 400)
    batch, seq = (8, 16) if args.tiny else (16, 256)

    base = build_llama(args.tiny, device, dtype, width=1024).eval()
    target = make_target(base, args.rank)
    vocab = base.config.vocab_size
    ranks = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < args.rank] + [args.rank]
    results = {}
    for label, sampler in (("LoRA", None), ("DyLoRA", RankSampler(1, args.rank, seed=0))):
        model = copy.deepcopy(base)
        inject_adapters(model, TARGETS, method="dylora", r=args.rank, alpha=float(args.rank))
        for p in model.parameters():  # adapters train in float32 on a bf16 base, as peft keeps them
            if p.requires_grad:
                p.data = p.data.float()
        seconds = train(model.train(), target, args.rank, sampler, steps, batch, seq, vocab, device)
        results[label] = evaluate(model.eval(), target, ranks, batch, seq, vocab, device)
        print(f"{label}: {steps} steps in {seconds:.1f} s on {device} ({dtype})")
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        no_adapter = kl(base(ids, use_cache=False).logits, target(ids, use_cache=False).logits).item()
    print(
        f"\nKL(target || model) at each evaluation rank (lower is better; the base without adapter: {no_adapter:.4f})"
    )
    print("| adapter | " + " | ".join(f"b={b}" for b in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for label, by_rank in results.items():
        print(f"| {label} | " + " | ".join(f"{by_rank[b]:.4f}" for b in ranks) + " |")
    return results


if __name__ == "__main__":
    main()
