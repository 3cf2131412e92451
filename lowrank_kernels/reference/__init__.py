"""Plain PyTorch reference for every op: the spec, the CPU backend and the test oracle (one module per op)."""

from .lora import dropout_mask, lora_backward, lora_forward, lora_linear_ref

__all__ = ["dropout_mask", "lora_backward", "lora_forward", "lora_linear_ref"]
