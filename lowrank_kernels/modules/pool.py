"""``AdapterPool``: many adapters for one base layer in preallocated tensors (the ``MultiLoRALinear``'s pool).

It holds up to ``capacity`` adapters of rank ``<= max_rank`` (``lora_A [n, Rmax, K]``, ``lora_B [n, N, Rmax]``,
DoRA's ``g [n, N]``): loading and unloading adapters writes into slots and never reallocates, so a CUDA graph
captured once stays valid while adapters come and go. Per-batch metadata: ``ops.multi_lora.batch.AdapterBatch``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._checks import is_int as _is_int
from ..ops.dora.op import dora_weight_norm
from ..ops.multi_lora.batch import NO_ADAPTER
from ..ops.multi_lora.naive import AdapterWeights, adapter_scale
from ..ops.multi_lora.op import multi_lora_norm_of


class SlotInfo(NamedTuple):
    """What the batch metadata needs to know of an occupied slot (part of the pool's ``signature``)."""

    rank: int
    alpha: float
    rslora: bool
    dora: bool


def _weight_of(name: str, t) -> Tensor:
    """A tensor, or a module holding one as ``.weight`` (peft's ``lora_A`` / ``lora_B`` are ``nn.Linear``)."""
    if isinstance(t, nn.Module) and isinstance(getattr(t, "weight", None), Tensor):
        t = t.weight
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (or a module with a .weight), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.detach()


class AdapterPool(nn.Module):
    """Up to ``capacity`` LoRA / rsLoRA / DoRA adapters for one base layer ``nn.Linear(in_features, out_features)``.

    Tensors (buffers, moved by ``.to()``, not in the state dict): ``lora_A [capacity, max_rank, in_features]``,
    ``lora_B [capacity, out_features, max_rank]`` (zero past each adapter's rank, and in empty slots),
    ``dora_slots [capacity]`` int32 (1 where the slot holds a DoRA adapter);
    ``magnitude_scale [capacity, out_features]`` float32 (DoRA's ``g_i = m_i / ||W0 + s_i B_i A_i||_row``, 1
    elsewhere; float32 whatever the pool's dtype, float64 for a float64 pool).
    ``base_weight``: the layer's ``W0 [out, in]`` (referenced, not copied); needed only to load DoRA adapters.

    ``trainable=True``: ``lora_A``, ``lora_B`` and DoRA's magnitudes ``magnitude [capacity, out_features]`` (peft's
    ``m`` of each DoRA slot) are ``nn.Parameter``s, so one optimizer trains every adapter of the pool in mixed
    batches; ``magnitude_scale`` is then recomputed from them at every use (``g_i = m_i / ||W0 + s_i B_i A_i||``,
    the norm detached, W0 read once for all DoRA slots), not cached. Gradients past each adapter's rank and of
    empty slots are zero, so those entries stay zero under any optimizer whose update of a zero gradient is zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        max_rank: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        base_weight: Tensor | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not _is_int(capacity) or capacity < 1:
            raise ValueError(f"capacity must be a positive int (the number of adapter slots), got {capacity!r}")
        if not _is_int(max_rank) or max_rank < 1:
            raise ValueError(f"max_rank must be a positive int (the largest adapter rank), got {max_rank!r}")
        if base_weight is not None:
            if not isinstance(base_weight, Tensor) or tuple(base_weight.shape) != (out_features, in_features):
                shape = tuple(base_weight.shape) if isinstance(base_weight, Tensor) else type(base_weight).__name__
                raise ValueError(f"base_weight must be [out_features, in_features] = {[out_features, in_features]}, "
                                 f"got {shape}")  # fmt: skip
            dtype = dtype or base_weight.dtype
            device = device or base_weight.device
        factory = dict(dtype=dtype or torch.get_default_dtype(), device=device)
        if not factory["dtype"].is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {factory['dtype']}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.capacity, self.max_rank = int(capacity), int(max_rank)
        self.trainable = bool(trainable)
        lora_A = torch.zeros(capacity, max_rank, in_features, **factory)
        lora_B = torch.zeros(capacity, out_features, max_rank, **factory)
        if self.trainable:
            self.lora_A, self.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
            self.magnitude = nn.Parameter(torch.ones(capacity, out_features, **factory))
        else:
            self.register_buffer("lora_A", lora_A, persistent=False)
            self.register_buffer("lora_B", lora_B, persistent=False)
        self.register_buffer("dora_slots", torch.zeros(capacity, dtype=torch.int32, device=device), persistent=False)
        # A plain attribute, moved by _apply but never cast: g multiplies whole output rows, bf16 would cost 0.4%.
        g_dtype = torch.promote_types(factory["dtype"], torch.float32)
        self._magnitude_scale = torch.ones(capacity, out_features, dtype=g_dtype, device=device)
        self._base_weight = (base_weight,)  # a tuple: not registered as this module's parameter
        self._slots: list[SlotInfo | None] = [None] * capacity
        self._names: dict[str, int] = {}
        self._untargeted: set[str] = set()  # adapters with no weights for this layer (add_untargeted)
        self._magnitudes: dict[int, Tensor] = {}  # DoRA's m as given, per slot (for weights())
        self._update_signature()

    @classmethod
    def for_linear(cls, linear: nn.Linear, capacity: int, max_rank: int, *, trainable: bool = False) -> AdapterPool:
        """A pool on ``linear``'s device and dtype, with its weight as the DoRA base."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, capacity, max_rank, base_weight=linear.weight,
                   trainable=trainable)  # fmt: skip

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.lora_A.device
        self._magnitude_scale = self._magnitude_scale.to(device)
        self._magnitudes = {slot: m.to(device) for slot, m in self._magnitudes.items()}
        return self

    # ---- contents ---------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    @property
    def device(self) -> torch.device:
        return self.lora_A.device

    @property
    def base_weight(self) -> Tensor | None:
        return self._base_weight[0]

    @property
    def magnitude_scale(self) -> Tensor:
        """DoRA's ``g [capacity, out_features]`` (1 off DoRA slots), float32 (float64 for a float64 pool).

        Serving: the value cached when each adapter was loaded. Trainable: ``m_i / ||W0 + s_i B_i A_i||_row`` from
        the current parameters (differentiable in ``magnitude``; the norm is a constant, as DoRA defines it)."""
        dora = [i for i, info in enumerate(self._slots) if info is not None and info.dora]
        if not self.trainable or not dora:
            return self._magnitude_scale
        infos = [self._slots[i] for i in dora]
        norms = multi_lora_norm_of(self.base_weight, self.lora_A, self.lora_B, dora,
                                   [adapter_scale(f.alpha, f.rank, f.rslora) for f in infos],
                                   [f.rank for f in infos])  # fmt: skip
        idx = torch.tensor(dora, device=self.device)
        g = self.magnitude.index_select(0, idx).to(norms.dtype) / norms
        return self._magnitude_scale.index_copy(0, idx, g.to(self._magnitude_scale.dtype))

    @property
    def names(self) -> dict[str, int]:
        """Loaded adapters: name -> slot."""
        return dict(self._names)

    @property
    def slots(self) -> tuple[SlotInfo | None, ...]:
        """Per slot: its ``SlotInfo`` (rank, alpha, rslora, dora), or None when empty."""
        return tuple(self._slots)

    @property
    def untargeted(self) -> frozenset[str]:
        """Adapters registered with ``add_untargeted``: known to the model, no weights in this layer."""
        return frozenset(self._untargeted)

    @property
    def signature(self) -> tuple:
        """What batch metadata depends on: capacity, every slot's ``SlotInfo`` and which name is where (a batch built
        from names must not be reused by a pool holding those names elsewhere). Equal signatures share batches."""
        return self._signature

    def _update_signature(self) -> None:
        names = tuple(sorted(self._names.items()))
        self._signature = (self.capacity, tuple(self._slots), names, tuple(sorted(self._untargeted)))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def slot(self, name: str) -> int:
        """The slot holding adapter ``name``; KeyError naming the loaded adapters if there is none."""
        if name not in self._names:
            raise KeyError(f"no adapter named {name!r} in this pool; loaded: {sorted(self._names) or 'none'}")
        return self._names[name]

    def scale(self, slot: int) -> float:
        """The full-rank scale ``alpha / r`` (rsLoRA ``alpha / sqrt(r)``) of the adapter in ``slot``."""
        info = self._slots[slot]
        if info is None:
            raise ValueError(f"slot {slot} is empty")
        return adapter_scale(info.alpha, info.rank, info.rslora)

    def weights(self, name: str) -> AdapterWeights:
        """Adapter ``name`` as stored (views into the pool, in the pool's dtype; ``magnitude`` is None for LoRA)."""
        slot = self.slot(name)
        info = self._slots[slot]
        magnitude = self._magnitudes.get(slot)
        if self.trainable and info.dora:
            magnitude = self.magnitude[slot].detach()
        return AdapterWeights(self.lora_A[slot, : info.rank].detach(), self.lora_B[slot, :, : info.rank].detach(),
                              info.alpha, info.rslora, magnitude)  # fmt: skip

    def peft_state(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name`` in peft's layout, detached copies: ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``
        and, for DoRA, ``lora_magnitude_vector [out]`` (the keys of one layer of peft's adapter file)."""
        w = self.weights(name)
        state = {"lora_A.weight": w.lora_A.clone(), "lora_B.weight": w.lora_B.clone()}
        if w.magnitude is not None:
            state["lora_magnitude_vector"] = w.magnitude.clone()
        return state

    # ---- load / unload ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def add(
        self,
        name: str,
        lora_A: Tensor | nn.Module,
        lora_B: Tensor | nn.Module,
        alpha: float,
        magnitude: Tensor | None = None,
        rslora: bool = False,
    ) -> int:
        """Load an adapter into the first free slot (no reallocation) and return the slot.

        lora_A: [r, in_features] (peft's ``lora_A.weight``, or the ``nn.Linear`` itself), lora_B: [out_features, r],
        ``1 <= r <= max_rank``; alpha: the adapter's ``lora_alpha`` (scale ``alpha / r``, rsLoRA ``alpha / sqrt(r)``);
        magnitude: DoRA's ``m [out_features]`` (peft's ``lora_magnitude_vector``), which needs ``base_weight``: its
        ``g = m / ||W0 + s B A||_row`` is computed here, once, without forming ``[out, in]``. Floating-point tensors
        are copied in the pool's dtype and device (peft keeps adapters in float32 beside a bf16 model).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._names:
            raise ValueError(f"adapter {name!r} is already loaded (slot {self._names[name]}); remove it first")
        if name in self._untargeted:
            raise ValueError(f"adapter {name!r} is registered as not targeting this layer; remove it first")
        A, B = _weight_of("lora_A", lora_A), _weight_of("lora_B", lora_B)
        K, N = self.in_features, self.out_features
        if A.dim() != 2 or A.shape[1] != K:
            transposed = A.dim() == 2 and A.shape[0] == K
            hint = " (transposed? lora_A is [r, in_features], as peft's lora_A.weight)" if transposed else ""
            raise ValueError(f"lora_A must be [r, in_features] = [r, {K}], got {tuple(A.shape)}{hint}")
        r = A.shape[0]
        if not 1 <= r <= self.max_rank:
            raise ValueError(f"lora_A has rank {r}, outside this pool's [1, max_rank={self.max_rank}]")
        if tuple(B.shape) != (N, r):
            raise ValueError(f"lora_B must be [out_features, r] = [{N}, {r}] (r from lora_A), got {tuple(B.shape)}")
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if magnitude is not None:
            magnitude = _weight_of("magnitude", magnitude)
            if tuple(magnitude.shape) != (N,):
                raise ValueError(f"magnitude must be [out_features] = [{N}], got {tuple(magnitude.shape)}")
            if self.base_weight is None:
                raise ValueError("magnitude (DoRA) needs the pool's base_weight (W0) to normalise against: build the "
                                 "pool with AdapterPool.for_linear(linear, ...) or base_weight=")  # fmt: skip
        free = [i for i, s in enumerate(self._slots) if s is None]
        if not free:
            raise RuntimeError(f"AdapterPool is full: all {self.capacity} slots are taken "
                               f"({sorted(self._names)}); remove an adapter first")  # fmt: skip
        slot = free[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :r].copy_(A)
        self.lora_B[slot, :, :r].copy_(B)
        info = SlotInfo(int(r), float(alpha), bool(rslora), magnitude is not None)
        if info.dora:
            # g from the values the kernels will read (cast to the pool's dtype), against the frozen W0.
            norm = dora_weight_norm(self.base_weight, self.lora_A[slot, :r], self.lora_B[slot, :, :r],
                                    scale=adapter_scale(info.alpha, r, info.rslora), rank=r)  # fmt: skip
            m = magnitude.to(device=norm.device, dtype=norm.dtype)
            self._magnitude_scale[slot].copy_(m / norm)
            self._magnitudes[slot] = m.to(self._magnitude_scale.dtype).clone()
            if self.trainable:
                self.magnitude[slot].copy_(m)
        else:
            self._magnitude_scale[slot].fill_(1.0)
            if self.trainable:
                self.magnitude[slot].fill_(1.0)
        self.dora_slots[slot] = int(info.dora)
        self._slots[slot] = info
        self._names[name] = slot
        self._update_signature()
        return slot

    def add_untargeted(self, name: str) -> None:
        """Register adapter ``name`` as having no weights for this layer (peft: the layer is outside its
        ``target_modules``): rows that name it get the base output here, as in peft. Takes no slot."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._names:
            raise ValueError(f"adapter {name!r} is loaded in this pool (slot {self._names[name]}); remove it first")
        self._untargeted.add(name)
        self._update_signature()

    @torch.no_grad()
    def remove(self, name: str) -> int:
        """Unload adapter ``name`` and return its (now empty, zeroed) slot; KeyError if there is no such adapter.

        An adapter registered with ``add_untargeted`` is forgotten and -1 returned (it had no slot)."""
        if name in self._untargeted:
            self._untargeted.discard(name)
            self._update_signature()
            return NO_ADAPTER
        slot = self.slot(name)
        del self._names[name]
        self._slots[slot] = None
        self._magnitudes.pop(slot, None)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self._magnitude_scale[slot].fill_(1.0)
        if self.trainable:
            self.magnitude[slot].fill_(1.0)
        self.dora_slots[slot] = 0
        self._update_signature()
        return slot

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, capacity={self.capacity}, "
            f"max_rank={self.max_rank}, dtype={self.dtype}, loaded={len(self)}, trainable={self.trainable}"
        )
