"""``LoRALinear``: a drop-in ``nn.Linear`` with a LoRA / DyLoRA adapter computed by the fused op."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.lora.op import lora_linear
from .merge import DeltaMerge


class LoRALinear(DeltaMerge, nn.Module):
    """``y = x W0^T + bias + (alpha / b) * (drop(x) A[:b]^T) B[:, :b]^T`` with a frozen ``W0`` and active rank ``b``.

    Same forward signature and attributes as ``nn.Linear`` (``in_features``, ``out_features``, ``weight``,
    ``bias``); the adapter's parameters are named as peft names them (``lora_A.weight`` [r, in],
    ``lora_B.weight`` [out, r]) so state dicts interoperate. The scale at active rank ``b`` is ``alpha / b``
    (``alpha / sqrt(b)`` with rsLoRA): LoRA's ``alpha / r`` at full rank, DyLoRA's Eq. 7 when truncated.
    Adapters kept in float32 on a low-precision base (peft's default) are cast to the input's dtype per call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float = 8.0,
        dropout: float = 0.0,
        rslora: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base, r, alpha, dropout, rslora)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int, alpha: float = 8.0, dropout: float = 0.0, rslora: bool = False
    ) -> LoRALinear:
        """Wrap ``linear``'s weight and bias (shared, not copied) and freeze them."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(linear, r, alpha, dropout, rslora)
        return self

    def _init(self, linear: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, float(alpha), float(dropout), bool(rslora)
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()
        self._active_rank, self._frozen = r, False
        self.merged = False
        self._weight_before_merge: Tensor | None = None  # kept only for low-precision weights (see merge)

    def reset_lora_parameters(self) -> None:
        """LoRA's init, as peft does it: A Kaiming-uniform (a = sqrt(5)), B zeros, so the layer starts as W0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # ---- dynamic rank (DyLoRA) ---------------------------------------------------------------------------------

    @property
    def active_rank(self) -> int:
        return self._active_rank

    @property
    def frozen(self) -> bool:
        """DyLoRA frozen mode: only rank ``active_rank - 1`` of A and B is trained."""
        return self._frozen

    def set_rank(self, b: int, frozen: bool = False) -> None:
        """Use ``A[:b]``, ``B[:, :b]`` and scale ``alpha / b`` from now on; ``frozen`` trains only rank ``b - 1``."""
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.r:
            raise ValueError(f"b must be an int in [1, {self.r}] (this layer's r), got {b!r}")
        if self.merged:
            raise RuntimeError("set_rank on a merged LoRALinear: unmerge() first")
        self._active_rank, self._frozen = b, bool(frozen)

    @property
    def scaling(self) -> float:
        b = self._active_rank
        return self.lora_alpha / (math.sqrt(b) if self.use_rslora else b)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        dtype = x.dtype
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A.weight.to(dtype),
            self.lora_B.weight.to(dtype),
            scale=self.scaling,
            rank=self._active_rank,
            dropout=self.lora_dropout if self.training else 0.0,
            frozen=self._frozen,
        )

    # ---- merge ------------------------------------------------------------------------------------------------

    def delta_weight(self) -> Tensor:
        """``scale * B[:, :b] A[:b]`` in float32 (float64 for a float64 layer), [out, in]."""
        b, dtype = self._active_rank, torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            return self.scaling * (self.lora_B.weight[:, :b].to(dtype) @ self.lora_A.weight[:b].to(dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, active_rank={self._active_rank}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, "
            f"rslora={self.use_rslora}, frozen={self._frozen}, merged={self.merged}"
        )
