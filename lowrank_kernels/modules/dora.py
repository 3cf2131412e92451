"""``DoRALinear``: a drop-in ``nn.Linear`` with a DoRA adapter (weight-decomposed LoRA) computed by the fused op."""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from ..ops.dora.op import dora_linear, dora_weight_norm, weight_norm_sq
from ..ops.lora.naive import cast
from ..ops.lora.op import dropout_mask
from .lora import LoRALinear, Quantized4bitBase, lowrank_term, parameter


def _identity(t: Tensor) -> tuple | None:
    """What says a tensor still holds the values it held: the object, its version counter, storage, dtype, device.

    None for an inference-mode tensor (no version counter): it is never cached against.
    """
    if t.is_inference():
        return None
    return (weakref.ref(t), t._version, t.data_ptr(), t.dtype, t.device)


def _same(key: tuple | None, cached: tuple | None) -> bool:
    if key is None or cached is None or len(key) != len(cached):
        return False
    for a, b in zip(key, cached, strict=True):
        if isinstance(a, weakref.ref):
            if a() is None or a() is not b():
                return False
        elif a != b:
            return False
    return True


class DoRALinear(LoRALinear):
    """``y = g * (x W0^T + s (x A[:b]^T) B[:, :b]^T) + bias``, ``g = m / ||W0 + s B[:, :b] A[:b]||_row`` (detached).

    In training with dropout, peft's form: ``y = x W0^T + bias + (g - 1) drop(x) W0^T + g s (drop(x) A^T) B^T``.
    Everything else is ``LoRALinear``'s (frozen shared ``W0``, active rank ``b`` and its scale, rsLoRA, DyLoRA's
    ``set_rank(b, frozen)``), plus the trainable magnitude ``lora_magnitude_vector`` [out], initialised to the row
    norms ``||W0 + s B A||`` (``||W0||`` with LoRA's ``B = 0``), so the wrapped layer starts equal to the original.

    State dicts: ``weight``, ``bias``, ``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``. These are
    exactly the keys of a peft DoRA adapter file (``get_peft_model_state_dict`` / ``adapter_model.safetensors``)
    below the layer's prefix; from a live peft layer's ``state_dict()`` drop the adapter name (``.default``) and,
    for the magnitude, peft's trailing ``.weight`` (``lora_magnitude_vector.default.weight``). The cached
    ``||W0_n||^2`` is a non-persistent buffer ``weight_norm_sq``.

    Inference cache: in eval mode with autograd off (``torch.no_grad``/``inference_mode``), the row norm is computed
    once and reused while ``W0``, A, B, the active rank and the input dtype are unchanged (their version counters,
    storage and identity; ``train()``/``eval()`` and ``clear_norm_cache()`` drop it), so inference costs LoRA plus
    a per-column scale. Training always recomputes it: fused optimisers (``AdamW(fused=True)``) update parameters
    without moving their version counters, so a cache there could go stale silently. Under ``torch.compile`` the
    norm is computed inside the graph.
    """

    def _init(self, linear: nn.Linear, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super()._init(linear, r, alpha, dropout, rslora)  # its reset_lora_parameters() runs before m exists
        self.register_buffer("weight_norm_sq", weight_norm_sq(self.base_weight), persistent=False)
        self._weight_norm_sq_key = _identity(self.weight)
        self._norm_cache: tuple[tuple | None, Tensor] | None = None
        self._merge_scale: Tensor | None = None  # g at merge time: unmerge divides by it
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        self.reset_magnitude()

    @classmethod
    def quantized_class(cls) -> type:
        if cls is DoRALinear:
            return DoRALinear4bit
        raise TypeError(f"{cls.__name__} does not support a bitsandbytes 4-bit base")

    def reset_lora_parameters(self) -> None:
        """LoRA's init (A Kaiming-uniform, B zeros), then the magnitude from it, as peft does."""
        super().reset_lora_parameters()
        if "lora_magnitude_vector" in self._parameters:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ||W0 + s B[:, :b] A[:b]||_row`` at the active rank (peft's initialisation of the magnitude)."""
        self.lora_magnitude_vector.copy_(self._weight_norm(self.lora_magnitude_vector.dtype))

    # ---- the cached norm --------------------------------------------------------------------------------------

    def _current_weight_norm_sq(self) -> Tensor:
        """The ``||W0_n||^2`` buffer, recomputed if W0 changed (load_state_dict, merge, a move or cast)."""
        key = _identity(parameter(self, "weight"))
        if not _same(key, self._weight_norm_sq_key):
            self.weight_norm_sq = weight_norm_sq(self.base_weight)
            self._weight_norm_sq_key = key
        return self.weight_norm_sq

    def _weight_norm(self, dtype: torch.dtype) -> Tensor:
        """The detached row norm at the active rank with A and B cast to ``dtype`` (as forward uses them)."""
        A, B = (cast(t, dtype) for t in self.factors())
        return dora_weight_norm(self.base_weight, A, B, scale=self.scaling, rank=self._active_rank,
                                weight_norm_sq=self._current_weight_norm_sq())  # fmt: skip

    def _cached_weight_norm(self, dtype: torch.dtype) -> Tensor:
        """``_weight_norm``, reused while W0, A, B, the rank, the scale and ``dtype`` are what they were."""
        parts = [_identity(t) for t in (parameter(self, "weight"), *self.factors())]
        key = None if None in parts else (*parts, self._active_rank, self.scaling, dtype)
        if self._norm_cache is not None and _same(key, self._norm_cache[0]):
            return self._norm_cache[1]
        norm = self._weight_norm(dtype)
        self._norm_cache = (key, norm) if key is not None else None
        return norm

    def clear_norm_cache(self) -> None:
        """Forget the cached norms (needed only after changing W0, A or B behind autograd's back, e.g. ``.data``)."""
        self._norm_cache = None
        self._weight_norm_sq_key = None

    def train(self, mode: bool = True) -> DoRALinear:
        self._norm_cache = None
        return super().train(mode)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.base_weight, self.bias)
        dtype = x.dtype
        weight_norm = None  # computed by the op: always under torch.compile (the caches are Python state)
        if not torch.compiler.is_compiling():
            inference = not self.training and not torch.is_grad_enabled()
            weight_norm = self._cached_weight_norm(dtype) if inference else self._weight_norm(dtype)
        A, B = self.factors()
        return dora_linear(
            x,
            self.base_weight,
            parameter(self, "bias"),
            cast(A, dtype),
            cast(B, dtype),
            cast(parameter(self, "lora_magnitude_vector"), dtype),
            scale=self.scaling,
            rank=self._active_rank,
            dropout=self.lora_dropout if self.training else 0.0,
            frozen=self._frozen,
            weight_norm=weight_norm,
        )

    # ---- merge ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``weight`` in place: ``W = g * (W0 + s B A)`` row-wise (peft's DoRA merge).

        Refuses a non-finite adapter or scale. Keeps ``g`` for ``unmerge``, which then divides by it: float32 and
        float64 weights come back within rounding; a lower-precision weight (or any zero in ``g``) keeps its
        original values instead (one weight-sized copy), so ``unmerge`` is exact.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        delta, weight = self.delta_rows(), self.base_weight  # [out, in] (a view of a Conv1D's [in, out] weight)
        if not torch.isfinite(delta).all():
            raise ValueError("refusing to merge: the adapter's delta weight has NaN or Inf entries")
        merged = weight.to(delta.dtype) + delta
        g = self.lora_magnitude_vector.to(delta.dtype) / torch.linalg.vector_norm(merged, dim=1)
        if not torch.isfinite(g).all():
            raise ValueError("refusing to merge: the magnitude scale m / ||W0 + s B A|| has NaN or Inf entries")
        if self.weight.dtype not in (torch.float32, torch.float64) or not bool((g != 0).all()):
            self._weight_before_merge = self.weight.detach().clone()
        self._merge_scale = g
        weight.copy_((g[:, None] * merged).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: the weight returns to its value before the merge (within fp32 rounding, or exactly)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        if self._weight_before_merge is not None:
            self.weight.copy_(self._weight_before_merge)
            self._weight_before_merge = None
        else:
            delta, weight = self.delta_rows(), self.base_weight
            weight.copy_((weight.to(delta.dtype) / self._merge_scale[:, None] - delta).to(weight.dtype))
        self._merge_scale = None
        self.merged = False


# Elements of W0 dequantised at once by the 4-bit row norm: a block of rows, never the whole [N, K].
DEQUANT_BLOCK_ELEMENTS = 1 << 20


def quantized_row_norm(layer: nn.Module, A: Tensor, B: Tensor, scale: float, dtype: torch.dtype,
                       block_elements: int = DEQUANT_BLOCK_ELEMENTS) -> Tensor:  # fmt: skip
    """``||W0 + scale * B A||`` per row [N] of a bitsandbytes ``Linear4bit`` (W0 its dequantised weight), computed in
    ``dtype`` a block of rows at a time: each block's packed bytes and block scales are sliced and dequantised
    by bitsandbytes (``dequantize_4bit``), so at most ``block_elements`` (at least one row) exist in ``dtype``.
    A: [b, K], B: [N, b] (the active ranks). Needs ``in_features`` to be a multiple of the quantisation blocksize
    (rows then start on block boundaries) and the standard packing (not bitsandbytes' CPU inference repacking)."""
    import bitsandbytes.functional as bnb_f

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError(f"{type(layer).__name__}: its weight was repacked for bitsandbytes' CPU inference kernel "
                           "(an eval-mode forward without gradients); DoRA's row norm reads the standard layout: run "
                           "the model with gradients enabled or in train mode")  # fmt: skip
    N, K = state.shape
    if K % state.blocksize:
        raise ValueError(f"DoRA on a 4-bit layer needs in_features ({K}) to be a multiple of the quantisation "
                         f"blocksize ({state.blocksize}): its rows are dequantised a block at a time")  # fmt: skip
    absmax = state.absmax
    if state.nested:  # double quantisation: the block scales are themselves quantised (N * K / blocksize of them)
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = layer.weight.data.view(torch.uint8).reshape(-1)  # two 4-bit values per byte, row-major
    rows = max(1, block_elements // K)
    norm = torch.empty(N, device=A.device, dtype=dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        block_state = bnb_f.QuantState(absmax=absmax[n0 * K // state.blocksize : n1 * K // state.blocksize],
                                       shape=torch.Size((n1 - n0, K)), code=state.code, blocksize=state.blocksize,
                                       quant_type=state.quant_type, dtype=state.dtype)  # fmt: skip
        w = bnb_f.dequantize_4bit(packed[n0 * K // 2 : n1 * K // 2].reshape(-1, 1), block_state).to(dtype)
        norm[n0:n1] = torch.linalg.norm(w + scale * (B[n0:n1] @ A), dim=1)
    return norm


class DoRALinear4bit(Quantized4bitBase, DoRALinear):
    """``DoRALinear`` on a bitsandbytes 4-bit base, peft's QLoRA-DoRA formula with bitsandbytes' own product:
    ``y = base(x) + (g - 1) * (base(x) - bias) + g * s * (x A^T) B^T``, ``g = m / ||W0 + s B A||`` (detached; the
    row norm dequantises a block of rows at a time, ``quantized_row_norm``). With dropout in training, peft's
    form: the ``(g - 1)`` term is bitsandbytes' product of ``drop(x)`` without the bias."""

    def _init(self, linear: nn.Module, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        LoRALinear._init(self, linear, r, alpha, dropout, rslora)  # no ||W0||^2 buffer: W0 stays packed
        self._norm_cache = None
        self._merge_scale = None
        factory = dict(device=self.lora_A.weight.device, dtype=self._adapter_dtype())
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        self.reset_magnitude()

    def _weight_norm(self, dtype: torch.dtype) -> Tensor:
        b = self._active_rank
        A, B = self.lora_A.weight[:b].to(dtype), self.lora_B.weight[:, :b].to(dtype)
        with torch.no_grad():
            return quantized_row_norm(self.base_layer, A, B, self.scaling, dtype)

    def clear_norm_cache(self) -> None:
        self._norm_cache = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        A, B, m = self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector
        xa = x.to(A.dtype)
        inference = not self.training and not torch.is_grad_enabled()
        norm = self._cached_weight_norm(xa.dtype) if inference else self._weight_norm(xa.dtype)
        g = (m.to(xa.dtype) / norm).view(1, -1)
        dropout, seed = self.lora_dropout if self.training else 0.0, None
        if dropout > 0.0:  # peft: the base term of drop(x) is recomputed, without the bias
            lead, K = xa.shape[:-1], xa.shape[-1]
            seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
            mask = dropout_mask(seed, (math.prod(lead), K), dropout, x.device).to(xa.dtype)
            base = self._base_product((xa.reshape(-1, K) * mask).reshape(*lead, K)).to(xa.dtype)
        else:
            base = y.to(xa.dtype) if self.bias is None else y.to(xa.dtype) - self.bias.to(xa.dtype)
        # The adapter term on the fused primitives, its dropout (the same seed, so the same mask) fused in.
        lora = lowrank_term(xa, A, B, scale=self.scaling, rank=self._active_rank, dropout=dropout,
                            frozen=self._frozen, seed=seed)  # fmt: skip
        return y + ((g - 1) * base + g * lora).to(y.dtype)

    def _base_product(self, x: Tensor) -> Tensor:
        """bitsandbytes' dequantising product ``x W0^T`` without the bias, in the layer's compute dtype."""
        import bitsandbytes as bnb

        layer = self.base_layer
        compute = layer.compute_dtype or x.dtype
        return bnb.matmul_4bit(x.to(compute), layer.weight, bias=None, quant_state=layer.weight.quant_state)
