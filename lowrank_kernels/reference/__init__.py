"""Plain PyTorch reference for every op: the spec, the CPU backend and the test oracle (one module per op)."""

from .dora import dora_linear_ref
from .lora import dropout_mask, lora_backward, lora_forward, lora_linear_ref
from .multi_lora import multi_lora_forward, multi_lora_linear_ref

__all__ = [
    "dora_linear_ref",
    "dropout_mask",
    "lora_backward",
    "lora_forward",
    "lora_linear_ref",
    "multi_lora_forward",
    "multi_lora_linear_ref",
]
