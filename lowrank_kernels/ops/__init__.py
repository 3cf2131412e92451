"""Functional ops with autograd and torch.library registration."""

from .dora import dora_linear, dora_weight_norm
from .lora import dropout_mask, lora_linear
from .multi_lora import multi_lora_linear

__all__ = ["dora_linear", "dora_weight_norm", "dropout_mask", "lora_linear", "multi_lora_linear"]
