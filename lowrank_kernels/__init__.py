"""lowrank_kernels: fused GPU kernels for low-rank adapters (LoRA, DyLoRA, DoRA, AdaLoRA, multi-adapter serving).

Layers, one direction of dependency: ``ops`` (one folder per op: the naive math, the registered op with its one
forward/backward orchestration, the Triton and CUDA C++ primitives) -> ``modules`` (drop-in nn.Linear replacements,
the adapter pool) -> ``training`` (DyLoRA, AdaLoRA) and ``models`` (peft's target rules, peft adapter files).
``backend``, ``_checks``, ``_triton_utils`` and ``_cuda_ext`` serve the ops and import nothing above them.
"""

from .backend import BackendUnavailableError, available_backends, use_backend
from .models.inject import (
    ModulesToSave,
    adapter_layers,
    find_target_modules,
    inject_adapters,
    inject_multi_lora,
    remove_adapters,
)
from .models.peft_compat import load_peft_adapter, load_peft_adapters_for_serving, save_peft_adapter
from .models.peft_patch import patch_peft_model, unpatch_peft_model
from .modules.adalora import AdaLoRALinear
from .modules.dora import DoRALinear, DoRALinear4bit
from .modules.lora import LoRALinear, LoRALinear4bit
from .modules.multi_lora import MultiLoRALinear, multi_lora_layers, serve_batch, train_batch
from .modules.pool import AdapterPool
from .ops.dora.op import dora_linear, dora_weight_norm
from .ops.lora.op import dropout_mask, lora_linear
from .ops.multi_lora.batch import AdapterBatch
from .ops.multi_lora.op import multi_lora_linear
from .training.adalora import AdaLoRAConfig, RankAllocator, orth_reg
from .training.dylora import RankSampler, set_model_rank

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRALinear",
    "AdapterBatch",
    "AdapterPool",
    "BackendUnavailableError",
    "DoRALinear",
    "DoRALinear4bit",
    "LoRALinear",
    "LoRALinear4bit",
    "ModulesToSave",
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
    "multi_lora_layers",
    "multi_lora_linear",
    "orth_reg",
    "patch_peft_model",
    "remove_adapters",
    "save_peft_adapter",
    "serve_batch",
    "set_model_rank",
    "train_batch",
    "unpatch_peft_model",
    "use_backend",
]
