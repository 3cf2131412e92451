"""lowrank_kernels: fused GPU kernels for low-rank adapters (LoRA, DyLoRA, DoRA, AdaLoRA, multi-adapter serving).

Layers, one direction of dependency: ``kernels`` (Triton) -> ``ops`` (torch.library ops, autograd, functional API,
backend dispatch) -> ``modules`` (drop-in nn.Linear replacements) -> model-level helpers (``dylora``, ``adalora``,
``inject``: adapters into any model by module name, ``peft_compat``: peft's adapter files in and out).
``reference`` holds the plain PyTorch math every op is tested against.
"""

from .adalora import AdaLoRAConfig, RankAllocator, orth_reg
from .adapter_pool import AdapterBatch, AdapterPool
from .backend import BackendUnavailableError, available_backends, use_backend
from .dylora import RankSampler, set_model_rank
from .inject import adapter_layers, find_target_modules, inject_adapters, inject_multi_lora, remove_adapters
from .modules.adalora import AdaLoRALinear
from .modules.dora import DoRALinear
from .modules.lora import LoRALinear
from .modules.multi_lora import MultiLoRALinear, serve_batch
from .ops.dora import dora_linear, dora_weight_norm
from .ops.lora import dropout_mask, lora_linear
from .ops.multi_lora import multi_lora_linear
from .peft_compat import load_peft_adapter, load_peft_adapters_for_serving, save_peft_adapter

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRALinear",
    "AdapterBatch",
    "AdapterPool",
    "BackendUnavailableError",
    "DoRALinear",
    "LoRALinear",
    "MultiLoRALinear",
    "RankAllocator",
    "RankSampler",
    "adapter_layers",
    "available_backends",
    "dora_linear",
    "dora_weight_norm",
    "dropout_mask",
    "find_target_modules",
    "inject_adapters",
    "inject_multi_lora",
    "load_peft_adapter",
    "load_peft_adapters_for_serving",
    "lora_linear",
    "multi_lora_linear",
    "orth_reg",
    "remove_adapters",
    "save_peft_adapter",
    "serve_batch",
    "set_model_rank",
    "use_backend",
]
