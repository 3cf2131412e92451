"""The ops, one folder each (``lora``, ``dora``, ``multi_lora``): ``naive.py`` (the math: spec, CPU path, oracle),
``op.py`` (checks, registration, autograd and the one forward/backward orchestration), ``triton.py`` and ``cuda.py``
(the same primitives as kernels). The functional entry points are re-exported here."""

from .dora.op import dora_linear, dora_weight_norm
from .lora.op import dropout_mask, lora_linear
from .multi_lora.op import multi_lora_linear

__all__ = ["dora_linear", "dora_weight_norm", "dropout_mask", "lora_linear", "multi_lora_linear"]
