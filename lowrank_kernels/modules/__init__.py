"""Drop-in nn.Module replacements holding adapter parameters; they call the functional ops, never a kernel."""

from .adalora import AdaLoRALinear
from .dora import DoRALinear
from .lora import LoRALinear
from .multi_lora import MultiLoRALinear, serve_batch

__all__ = ["AdaLoRALinear", "DoRALinear", "LoRALinear", "MultiLoRALinear", "serve_batch"]
