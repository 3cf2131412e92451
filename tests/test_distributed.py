"""Data-parallel training with our adapters: DistributedDataParallel and FSDP2 (``fully_shard``) on 2 CPU processes.

Each process runs half of the batch; after the backward, the synchronised adapter gradients must equal those of one
process on the whole batch (mean loss, so DDP's and FSDP's gradient averaging is the exact counterpart). The processes
use gloo on the CPU, with the reference backend, so this runs in CI; on a GPU machine the same wrappers run the
kernels (scripts/gpu_run.sh runs the suite there, where these tests stay on the CPU).
"""

import gc
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank_kernels.models.inject import inject_adapters

WORLD = 2
BATCH = 8


def build_model(method: str) -> nn.Module:
    """A small MLP with adapters on two of its three layers, adapter weights randomised (B = 0 would hide errors)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 8))
    inject_adapters(model, ["0", "2"], method=method, r=4, alpha=8.0)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_E" in name:
            nn.init.normal_(p, std=0.3)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 8, generator=g)


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.mse_loss(model(x), y).backward()


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _worker(rank: int, store_path: str, wrapper: str, method: str, out_path: str) -> None:
    # A file store, not TCP: no port to pick and race for (a TCP rendezvous here aborted now and then)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        model = build_model(method)
        if wrapper == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in (model[0], model[2]):  # one FSDP unit per adapter layer, then the root
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        x, y = batch()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        with warnings.catch_warnings():  # FSDP2's advice about view outputs; nothing here writes to them in place
            warnings.simplefilter("ignore", UserWarning)
            step(model, x[rows], y[rows])
        grads = adapter_grads(model)
        if rank == 0:
            prefix = "module." if wrapper == "ddp" else ""
            torch.save({k.removeprefix(prefix): v for k, v in grads.items()}, out_path)
        # Release the wrapper (DDP's reducer) and line the ranks up before tearing gloo down: without this, torch 2.13
        # aborted at exit now and then ("terminate called without an active exception", ~1 run in 5).
        del model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["lora", "dora", "adalora"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_gradients_match_one_process(wrapper, method, tmp_path):
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), wrapper, method, out_path), nprocs=WORLD, join=True)
    parallel = torch.load(out_path)

    model = build_model(method)
    step(model, *batch())
    single = adapter_grads(model)

    assert parallel.keys() == single.keys() and len(single) >= 4
    for name, g in single.items():
        assert torch.count_nonzero(g) > 0, f"{name}: zero gradient makes the comparison vacuous"
        torch.testing.assert_close(parallel[name], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
