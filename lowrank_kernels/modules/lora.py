"""``LoRALinear``: a drop-in ``nn.Linear`` with a LoRA / DyLoRA adapter computed by the fused op."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn

from ..ops.lora.delta import lora_delta
from ..ops.lora.naive import cast
from ..ops.lora.op import lora_linear
from .merge import DeltaMerge


def linear_layout(layer: nn.Module, quantized: bool = True) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a base layer an adapter can wrap: an ``nn.Linear`` (weight
    [out, in]), a transformers ``Conv1D`` (GPT-2 style, weight [in, out]: peft's ``fan_in_fan_out=True``) or, with
    ``quantized``, a bitsandbytes ``Linear4bit``, whose ``forward`` is the class's own (a subclass that computes
    something else is refused). TypeError otherwise."""
    if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        return layer.in_features, layer.out_features, False
    if is_linear4bit(layer):
        if not quantized:
            raise TypeError(f"{type(layer).__name__}: a bitsandbytes 4-bit base is supported by LoRALinear and "
                            "DoRALinear only")  # fmt: skip
        return layer.in_features, layer.out_features, False
    if is_conv1d(layer):
        in_features, out_features = layer.weight.shape
        return in_features, out_features, True
    if isinstance(layer, nn.Linear):
        raise TypeError(
            f"{type(layer).__name__} is an nn.Linear subclass with its own forward; an adapter layer would skip "
            "that forward (e.g. a quantising one), so only nn.Linear itself is wrapped"
        )
    raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(layer).__name__}")


def is_conv1d(layer: nn.Module) -> bool:
    """A transformers ``pytorch_utils.Conv1D`` with its own forward (transformers is imported only if loaded)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D) and type(layer).forward is Conv1D.forward


def is_linear4bit(layer: nn.Module) -> bool:
    """A bitsandbytes ``nn.Linear4bit`` (NF4 / FP4) with its own forward (bitsandbytes is imported only if loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    return isinstance(layer, bnb.nn.Linear4bit) and type(layer).forward is bnb.nn.Linear4bit.forward


def lowrank_term(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scale: float,
    rank: int,
    dropout: float = 0.0,
    frozen: bool = False,
    y_base: Tensor | None = None,
    seed: int | None = None,
) -> Tensor:
    """``y_base + scale * (drop(x) A[:rank]^T) B[:, :rank]^T`` [..., out] (the adapter term alone without ``y_base``)
    for a base whose product is not ours (a bitsandbytes 4-bit layer), on the fused primitives (``lora_delta``).
    x: [..., in], lora_A [r, in], lora_B [out, r], y_base [..., out] of x's dtype; dropout: the fused op's seeded mask
    (``dropout_mask``; ``seed`` drawn from torch's generator when None); frozen: DyLoRA's, only rank ``rank - 1``
    gets gradient."""
    return lora_delta(y_base, x, lora_A, lora_B, scale=scale, rank=rank, dropout=dropout, frozen=frozen, seed=seed)


def parameter(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name)``, read from ``module._parameters`` when it is a plain parameter: a forward reads four or
    five, and ``nn.Module.__getattr__`` (~0.6 us each on a CPU) is a large part of a decode step's host time. Any
    other attribute (a parametrized weight, a buffer, a property, a None bias) goes through getattr."""
    found = module._parameters.get(name)
    return found if found is not None else getattr(module, name)


def peft_alias(name: str, value, peft_name: str, peft_value, default):
    """One argument given under our name (``alpha``) or peft's (``lora_alpha``), not both; ``default`` if neither."""
    if peft_value is None:
        return default if value is None else value
    if value is not None:
        raise TypeError(f"got both {name}={value!r} and peft's {peft_name}={peft_value!r}; pass one of them")
    return peft_value


def _lora_args(alpha, dropout, rslora, lora_alpha, lora_dropout, use_rslora) -> tuple[float, float, bool]:
    return (peft_alias("alpha", alpha, "lora_alpha", lora_alpha, 8.0),
            peft_alias("dropout", dropout, "lora_dropout", lora_dropout, 0.0),
            peft_alias("rslora", rslora, "use_rslora", use_rslora, False))  # fmt: skip


class LoRALinear(DeltaMerge, nn.Module):
    """``y = x W0^T + bias + (alpha / b) * (drop(x) A[:b]^T) B[:, :b]^T`` with a frozen ``W0`` and active rank ``b``.

    Same forward signature and attributes as ``nn.Linear`` (``in_features``, ``out_features``, ``weight``,
    ``bias``); the adapter's parameters are named as peft names them (``lora_A.weight`` [r, in],
    ``lora_B.weight`` [out, r]) so state dicts interoperate. The scale at active rank ``b`` is ``alpha / b``
    (``alpha / sqrt(b)`` with rsLoRA): LoRA's ``alpha / r`` at full rank, DyLoRA's Eq. 7 when truncated.
    Adapters kept in float32 on a low-precision base (peft's default) are cast to the input's dtype per call.

    A transformers ``Conv1D`` base (GPT-2; peft's ``fan_in_fan_out``) keeps its ``weight`` Parameter [in, out] as
    it is (same object, same state-dict key); the op reads it transposed (``base_weight``, a view, never a copy).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float | None = None,
        dropout: float | None = None,
        rslora: bool | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        lora_alpha: float | None = None,
        lora_dropout: float | None = None,
        use_rslora: bool | None = None,
    ) -> None:
        """alpha (default 8), dropout (default 0) and rslora (default False) may be given by peft's names
        ``lora_alpha``, ``lora_dropout``, ``use_rslora`` instead."""
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base, r, *_lora_args(alpha, dropout, rslora, lora_alpha, lora_dropout, use_rslora))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float | None = None,
        dropout: float | None = None,
        rslora: bool | None = None,
        *,
        lora_alpha: float | None = None,
        lora_dropout: float | None = None,
        use_rslora: bool | None = None,
    ) -> LoRALinear:
        """Wrap ``linear``'s weight and bias (shared, not copied) and freeze them; ``linear``: an ``nn.Linear`` or a
        transformers ``Conv1D``. alpha (default 8), dropout (default 0), rslora (default False): or peft's names."""
        args = _lora_args(alpha, dropout, rslora, lora_alpha, lora_dropout, use_rslora)
        linear_layout(linear)  # TypeError before anything is built
        if is_linear4bit(linear):
            cls = cls.quantized_class()  # the bitsandbytes product stays bitsandbytes'; the adapter term is ours
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(linear, r, *args)
        return self

    def _init(self, linear: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features, self.fan_in_fan_out = linear_layout(linear)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, float(alpha), float(dropout), bool(rslora)
        self._adopt_base(linear)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=linear.weight.device, dtype=self._adapter_dtype())
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()
        self._active_rank, self._frozen = r, False
        self.merged = False
        self._weight_before_merge: Tensor | None = None  # kept only for low-precision weights (see merge)

    def _adopt_base(self, linear: nn.Module) -> None:
        """Hold the base layer's weight and bias Parameters themselves (shared: same objects, same keys)."""
        self.weight = linear.weight
        self.bias = linear.bias

    def _adapter_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @classmethod
    def quantized_class(cls) -> type:
        """The class that wraps a bitsandbytes 4-bit base for this kind of adapter."""
        if cls is LoRALinear:
            return LoRALinear4bit
        raise TypeError(f"{cls.__name__} does not support a bitsandbytes 4-bit base")

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
    def base_weight(self) -> Tensor:
        """W0 as [out, in]: ``weight`` itself, or a transposed view of a Conv1D's [in, out] weight."""
        weight = parameter(self, "weight")
        return weight.t() if self.fan_in_fan_out else weight

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B): ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]."""
        return parameter(self._modules["lora_A"], "weight"), parameter(self._modules["lora_B"], "weight")

    @property
    def scaling(self) -> float:
        b = self._active_rank
        return self.lora_alpha / (math.sqrt(b) if self.use_rslora else b)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.base_weight, self.bias)
        dtype = x.dtype
        A, B = self.factors()
        return lora_linear(
            x,
            self.base_weight,
            parameter(self, "bias"),
            cast(A, dtype),
            cast(B, dtype),
            scale=self.scaling,
            rank=self._active_rank,
            dropout=self.lora_dropout if self.training else 0.0,
            frozen=self._frozen,
        )

    # ---- merge ------------------------------------------------------------------------------------------------

    def delta_rows(self) -> Tensor:
        """``scale * B[:, :b] A[:b]`` in float32 (float64 for a float64 layer), [out, in]."""
        b, dtype = self._active_rank, torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            return self.scaling * (self.lora_B.weight[:, :b].to(dtype) @ self.lora_A.weight[:b].to(dtype))

    def delta_weight(self) -> Tensor:
        """``delta_rows()`` in ``weight``'s own layout ([in, out] for a Conv1D base), as peft's ``get_delta_weight``."""
        delta = self.delta_rows()
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, active_rank={self._active_rank}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, "
            f"rslora={self.use_rslora}, frozen={self._frozen}, merged={self.merged}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
        )


class Quantized4bitBase:
    """Mixin for adapter layers over a bitsandbytes ``Linear4bit`` (QLoRA, as peft's ``lora.bnb.Linear4bit``): the
    base layer is kept whole as ``base_layer`` (its packed weight and quantisation state, peft's state-dict keys
    ``base_layer.weight``...), its product is bitsandbytes' own ``base_layer(x)``; ``weight`` / ``bias`` read the
    base layer's. Adapters are created in the base's compute dtype (float32 by default, as peft). Merging would need
    a re-quantisation and is refused."""

    def _adopt_base(self, linear: nn.Module) -> None:
        self.base_layer = linear

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def base_weight(self) -> Tensor:
        raise TypeError(f"{type(self).__name__}: the 4-bit base weight is packed; its product is base_layer(x)")

    def _adapter_dtype(self) -> torch.dtype:
        return getattr(self.base_layer, "compute_dtype", None) or torch.float32

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}: merging into a 4-bit base weight would re-quantise it; "
                                  "not supported (dequantise the model first)")  # fmt: skip


class LoRALinear4bit(Quantized4bitBase, LoRALinear):
    """``LoRALinear`` on a bitsandbytes 4-bit base: ``y = base_layer(x) + scale * (drop(x) A[:b]^T) B[:, :b]^T``."""

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        A, B = self.lora_A.weight, self.lora_B.weight
        out = lowrank_term(cast(x, A.dtype), A, B, scale=self.scaling, rank=self._active_rank,
                           dropout=self.lora_dropout if self.training else 0.0, frozen=self._frozen,
                           y_base=cast(y, A.dtype))  # fmt: skip
        return cast(out, y.dtype)
