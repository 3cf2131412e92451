"""Functional ops with autograd and torch.library registration."""

from .lora import dropout_mask, lora_linear

__all__ = ["dropout_mask", "lora_linear"]
