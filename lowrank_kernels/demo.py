"""``python -m lowrank_kernels``: LoRA vs DyLoRA on a synthetic task with a known low-rank target.

A small MLP with frozen random base weights is the student. The teacher is the same MLP with a rank-``r``
delta added to each base weight, whose singular values decay geometrically, so the best rank-``b``
approximation of the target is known. Two adapters are trained from the same init with the same data,
optimizer and learning rate:

* **LoRA**: always at the full rank ``r``;
* **DyLoRA**: rank ``b ~ U[1, r]`` sampled each step (non-frozen mode, scale ``alpha / b``).

Both are then evaluated truncated to ranks ``b = 1, 2, 4, ..., r``. In miniature this is the DyLoRA paper's
Table 2: the LoRA adapter is only good at the rank it was trained at, the DyLoRA adapter is good at all.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from lowrank_kernels.modules.lora import LoRALinear
from lowrank_kernels.training.dylora import RankSampler, set_model_rank

IN_DIM, HIDDEN, OUT_DIM = 64, 128, 64
DECAY = 0.6  # ratio of consecutive singular values of the teacher's deltas
TOP_SIGMA = 3.0  # largest singular value of each delta
ALPHA = 8.0
LR = 3e-3
BATCH = 256
EVAL_SIZE = 4096


def _mlp(gen: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT_DIM))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    model.requires_grad_(False)
    return model


def _low_rank_delta(n: int, k: int, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random orthonormal U [n, rank], V [k, rank] and geometrically decaying singular values S [rank]."""
    u, _ = torch.linalg.qr(torch.randn(n, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(k, rank, generator=gen))
    s = TOP_SIGMA * DECAY ** torch.arange(rank, dtype=torch.float32)
    return u, s, v


def _teacher(base: nn.Sequential, deltas: list, b: int | None) -> nn.Sequential:
    """A copy of the (CPU) base model plus each delta cut to its best rank-``b`` approximation (``None``: all)."""
    t = copy.deepcopy(base)
    linears = [m for m in t if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m, (u, s, v) in zip(linears, deltas, strict=True):
            k = len(s) if b is None else b
            m.weight += (u[:, :k] * s[:k]) @ v[:, :k].T
    return t


def _to_lora(model: nn.Sequential, rank: int) -> nn.Sequential:
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            model[i] = LoRALinear.from_linear(m, r=rank, alpha=ALPHA)
    return model


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return nn.functional.mse_loss(model(x), y).item()


def _train(model: nn.Module, teacher: nn.Module, steps: int, seed: int, sampler: RankSampler | None, device) -> None:
    """Adam on fresh batches from a seeded stream (same stream for both adapters)."""
    gen = torch.Generator().manual_seed(seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    model.train()
    for _ in range(steps):
        x = torch.randn(BATCH, IN_DIM, generator=gen).to(device)
        with torch.no_grad():
            y = teacher(x)
        if sampler is not None:
            sampler.apply(model)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _backend_name(device: torch.device) -> str:
    """The backend ``lowrank_kernels.backend.dispatch`` picks for LoRA ops on ``device`` (first choice)."""
    from lowrank_kernels import backend

    name = backend.requested_backend()
    if name is not None:
        return f"{name} (requested)"
    candidates = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
    for name in candidates:
        if backend.availability(name, device) is None:
            return f"{name} (auto)" + (" [PyTorch reference]" if name == "torch" else "")
    return "torch (auto)"  # pragma: no cover - torch is always available


def _ranks(r: int) -> list[int]:
    out, b = [], 1
    while b < r:
        out.append(b)
        b *= 2
    return out + [r]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank_kernels",
        description="LoRA vs DyLoRA, synthetic task with a known low-rank target: the DyLoRA paper's Table 2 in small.",
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps per adapter (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data and rank sampling")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available"
    )
    parser.add_argument("--rank", type=int, default=8, help="allocated LoRA rank r (default 8)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.rank < 1:
        parser.error("--rank must be >= 1")

    device = torch.device(args.device)
    # The matrices are tiny: one CPU thread is as fast as several, and immune to oversubscription on a busy
    # machine (where intra-op threads spin-wait and a run can take 10x longer). Restored on exit.
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device: torch.device) -> dict:
    t0 = time.perf_counter()
    r = args.rank
    gen = torch.Generator().manual_seed(args.seed)
    base = _mlp(gen)
    deltas = [_low_rank_delta(m.out_features, m.in_features, r, gen) for m in base if isinstance(m, nn.Linear)]
    teacher = _teacher(base, deltas, None).to(device)
    x_eval = torch.randn(EVAL_SIZE, IN_DIM, generator=gen).to(device)
    with torch.no_grad():
        y_eval = teacher(x_eval)
    base_loss = _loss(copy.deepcopy(base).to(device), x_eval, y_eval)

    with torch.random.fork_rng(devices=[]):  # the adapters' init (A random, B zero), identical for both
        torch.manual_seed(args.seed)
        lora = _to_lora(copy.deepcopy(base), r).to(device)
    dylora = copy.deepcopy(lora)

    _train(lora, teacher, args.steps, args.seed, None, device)
    _train(dylora, teacher, args.steps, args.seed, RankSampler(1, r, seed=args.seed), device)

    ranks = _ranks(r)
    rows = []
    for b in ranks:
        set_model_rank(lora, b)
        set_model_rank(dylora, b)
        svd = _loss(_teacher(base, deltas, b).to(device), x_eval, y_eval)
        rows.append({"b": b, "lora": _loss(lora, x_eval, y_eval), "dylora": _loss(dylora, x_eval, y_eval), "svd": svd})
    elapsed = time.perf_counter() - t0

    print(f"lowrank_kernels demo: LoRA vs DyLoRA, MLP {IN_DIM}->{HIDDEN}->{OUT_DIM}, r={r}, {args.steps} steps")
    print(f"device: {device}, backend: {_backend_name(device)}")
    print(f"target: each base weight + rank-{r} delta, singular values {TOP_SIGMA:g} * {DECAY:g}^k")
    print(f"eval MSE vs the teacher at active rank b; no adapter: {base_loss:.4f}")
    print("SVD-b: the base plus the true deltas cut to their best rank-b approximation (a reference, not a bound)")
    print(f"{'b':>4} {'LoRA':>10} {'DyLoRA':>10} {'SVD-b':>10}")
    for row in rows:
        print(f"{row['b']:>4} {row['lora']:>10.4f} {row['dylora']:>10.4f} {row['svd']:>10.4f}")
    print(f"({elapsed:.1f} s)")
    return {"base": base_loss, "ranks": ranks, "rows": rows, "seconds": elapsed}


if __name__ == "__main__":  # pragma: no cover
    main()
