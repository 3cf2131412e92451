"""What the examples share: the device and dtype choice, a transformers Llama built from a config, a timer."""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def device_and_dtype(tiny: bool) -> tuple[torch.device, torch.dtype]:
    """A GPU in bf16 at real sizes; float32 with ``--tiny`` or on the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" and not tiny else torch.float32


def build_llama(tiny: bool, device: torch.device, dtype: torch.dtype, width: int = 2048) -> LlamaForCausalLM:
    """A Llama with random weights (seeded, nothing downloaded): 2 layers x 64 wide if ``tiny``, else 4 x ``width``."""
    width, layers = (64, 2) if tiny else (width, 4)
    config = LlamaConfig(vocab_size=256 if tiny else 8192, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (CUDA events on a GPU)."""
    fn()  # warm-up: Triton compiles, caches fill
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]
