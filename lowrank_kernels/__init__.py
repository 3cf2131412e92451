"""lowrank_kernels: fused GPU kernels for low-rank adapters (LoRA, DyLoRA, ...), with a PyTorch reference backend.

Layers, one direction of dependency: ``kernels`` (Triton) -> ``ops`` (torch.library ops, autograd, functional API,
backend dispatch) -> ``modules`` (drop-in nn.Linear replacements) -> training helpers (``dylora``).
"""

from .backend import BackendUnavailableError, available_backends, use_backend
from .dylora import RankSampler, set_model_rank
from .modules.lora import LoRALinear
from .ops.lora import dropout_mask, lora_linear

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "LoRALinear",
    "RankSampler",
    "available_backends",
    "dropout_mask",
    "lora_linear",
    "set_model_rank",
    "use_backend",
]
