"""Drop-in nn.Module replacements holding adapter parameters; they call the functional ops, never a kernel."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
