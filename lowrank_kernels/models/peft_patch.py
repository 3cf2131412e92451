"""Run an existing peft model on the fused ops, in place: ``report = patch_peft_model(model)``.

Every peft LoRA / rsLoRA / DoRA layer (``peft.tuners.lora.layer.Linear``) and AdaLoRA layer
(``peft.tuners.adalora.layer.SVDLinear``) whose parts we support gets an instance ``forward`` that calls
``ops.lora.op.lora_linear`` (AdaLoRA: with ``rank_scale = lora_E``) or ``ops.dora.op.dora_linear`` on peft's own
tensors. Nothing else changes: the modules, the ``nn.Parameter`` objects (an optimizer built before the patch keeps
training them), the state-dict keys, ``save_pretrained``, ``merge_and_unload``, ``set_adapter``,
``disable_adapter()`` and several adapters per layer (their sum, as peft). float32 adapters on a float16 / bfloat16
base (what ``get_peft_model`` makes by default) are cast to the base dtype per call, so those numbers equal peft's
to that dtype's rounding.

peft's mixed batches (``model(ids, adapter_names=[...])``, ``generate(..., adapter_names=...)``: one name per sequence
along dim 0, "__base__" for none) run on the multi-adapter gather op, ``ops.multi_lora.op.multi_lora_linear`` (the
segmented kernels on a GPU, the torch reference on a CPU): one call per layer over the adapters the batch names,
stacked per call from peft's parameters into the pool layout (``lora_A [n, r_max, K]``, ``lora_B [n, N, r_max]``,
each adapter's rank and peft's ``scaling``; a few rank x K copies, differentiable, so peft's parameters get their
gradients and an in-place update is always seen; only the row metadata, a pure function of the names, ranks and
scales, is cached). What peft refuses in a mixed batch is refused by peft's own code, with its error: a DoRA adapter
named in the batch, an AdaLoRA layer (peft's has no mixed-batch forward), names that do not match dim 0 (OPT's
flattened fc1 / fc2), merged layers. Adapter dropout in training (each adapter's own, in peft), a trainable base
weight and ``torch.compile`` tracing keep rows grouped by adapter, one fused ``lora_linear`` call per group.

Whatever a call needs that the fused ops do not do is run by peft's own forward, decided per call, so a number is
never silently different from peft's: a merged or disabled layer, extra forward arguments, autocast, inputs or
adapters of another dtype or device than the base weight (but for float32 adapters on a half base), several
adapters at once with DoRA among them (peft feeds each DoRA adapter the previous adapters' sum) or with dropout in
training. Layers that cannot be patched at all (another layer type — Embedding, Conv, quantized bases —,
``lora_bias``, LoRA variants other than DoRA, hooks on the base layer, ``fan_in_fan_out`` on anything but a
transformers ``Conv1D``) keep peft's forward and are listed in the report with the reason.

Dropout: ours is a counter-hash mask drawn per call, not torch's RNG stream, so with ``lora_dropout > 0`` a patched
run equals peft's in distribution, not step by step; in eval mode (or without dropout) the numbers are peft's.

peft is an optional dependency: it is imported here only, when a model is patched.
"""

from __future__ import annotations

import math
import types
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..modules.lora import is_conv1d, linear_layout
from ..modules.pool import SlotInfo
from ..ops.dora.op import dora_linear
from ..ops.lora.op import lora_linear
from ..ops.multi_lora.batch import NO_ADAPTER, AdapterBatch
from ..ops.multi_lora.naive import adapter_scale
from ..ops.multi_lora.op import multi_lora_linear

PATCH_ATTR = "_lowrank_kernels_peft_patch"  # set on a patched layer: what unpatch needs to restore


@dataclass
class PeftPatchReport:
    """What ``patch_peft_model`` did: ``patched`` maps a layer's name to its adapter kinds (e.g. ``"lora"``,
    ``"dora"``, ``"adalora"``), ``unpatched`` maps a peft layer's name to the reason it keeps peft's forward."""

    patched: dict[str, str] = field(default_factory=dict)
    unpatched: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.patched)} peft layers run on lowrank_kernels, {len(self.unpatched)} on peft's forward"]
        lines += [f"  not patched: {name}: {reason}" for name, reason in self.unpatched.items()]
        return "\n".join(lines)


def _peft_layer_types():
    """(LoRA Linear, AdaLoRA SVDLinear, BaseTunerLayer): imported here, so peft stays optional."""
    from peft.tuners.adalora.layer import SVDLinear
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import BaseTunerLayer

    return Linear, SVDLinear, BaseTunerLayer


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# ---------------------------------------------------------------------------------------------------------------
# What a layer and each of its adapters is: checked once at patch time (the report) and again on every call.
# ---------------------------------------------------------------------------------------------------------------


def _layer_problem(layer: nn.Module) -> str | None:
    """Why this peft layer cannot run on the fused ops at all, or None."""
    lora_linear_cls, svd_linear_cls, _ = _peft_layer_types()
    kind = type(layer)
    if kind is not lora_linear_cls and kind is not svd_linear_cls:
        if "Embedding" in kind.__name__:
            return "LoRA on an nn.Embedding is not supported"
        if "Conv" in kind.__name__:
            return f"LoRA on a convolution ({kind.__module__}.{kind.__name__}) is not supported"
        return f"the peft layer type {kind.__module__}.{kind.__name__} is not supported (quantized or other tuner)"
    base = layer.get_base_layer()
    try:  # the rule our own modules wrap by: nn.Linear's own forward, or a transformers Conv1D (weight [in, out])
        _, _, transposed = linear_layout(base)
    except TypeError as e:
        return f"the base layer: {e}"
    if transposed != bool(getattr(layer, "fan_in_fan_out", False)):
        return f"fan_in_fan_out={layer.fan_in_fan_out} does not match the {type(base).__name__} base's weight layout"
    if _has_hooks(base):
        return "the base layer has forward hooks (e.g. accelerate offloading), which the fused op would skip"
    if base.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the base weight has dtype {base.weight.dtype}"
    return None


def _is_adalora(layer: nn.Module) -> bool:
    return type(layer) is _peft_layer_types()[1]


def _adapter_problem(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of this (supported) layer cannot run on the fused ops, or None."""
    weight = layer.get_base_layer().weight
    if _is_adalora(layer):
        tensors = [layer.lora_A[name], layer.lora_B[name], layer.lora_E[name], layer.ranknum[name]]
        if layer.lora_A[name].shape[0] == 0:
            return f"adapter {name!r} has rank 0"
    else:
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        if layer.lora_bias.get(name, False) or lora_B.bias is not None:
            return f"adapter {name!r} uses lora_bias, which is not supported"
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or _has_hooks(lora_A) or _has_hooks(lora_B):
            return f"adapter {name!r}'s lora_A / lora_B are not plain nn.Linear modules"
        variant = layer.lora_variant.get(name)
        if variant is not None and type(variant).__name__ != "DoraLinearVariant":
            return f"adapter {name!r} is a LoRA variant ({type(variant).__name__}) we do not support"
        tensors = [lora_A.weight, lora_B.weight]
        if variant is not None:
            tensors.append(layer.lora_magnitude_vector[name].weight)
    for t in tensors:
        # float32 adapters on a half-precision base (peft's autocast_adapter_dtype default) are cast per call
        castable = t.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16)
        if (t.dtype != weight.dtype and not castable) or t.device != weight.device:
            return (f"adapter {name!r} is {t.dtype} on {t.device} but the base weight is {weight.dtype} on "
                    f"{weight.device}")  # fmt: skip
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"adapter {name!r}'s lora_dropout is a {type(layer.lora_dropout[name]).__name__}"
    return None


def _is_dora(layer: nn.Module, name: str) -> bool:
    return not _is_adalora(layer) and layer.lora_variant.get(name) is not None


def _dropout_p(layer: nn.Module, name: str) -> float:
    """The dropout probability peft's ``lora_dropout`` module applies now (0 in eval mode)."""
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _base_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """W0 as [out, in] (a Conv1D's [in, out] weight transposed: a view, never a copy) and the bias."""
    base = layer.get_base_layer()
    weight = base.weight.t() if is_conv1d(base) else base.weight
    return weight, base.bias


def _low_rank_term(layer: nn.Module, name: str) -> tuple[Tensor, Tensor, float, Tensor | None]:
    """(A [R, K], B [N, R], scale, rank_scale [R] | None) of a LoRA or AdaLoRA adapter, peft's own tensors."""
    if _is_adalora(layer):
        # peft: (x (A * E)^T B^T) * scaling / (ranknum + 1e-5). ranknum is a Parameter that peft leaves trainable
        # (so an optimizer moves it): it enters the per-rank scale as a tensor, so it gets peft's gradient too.
        ranknum = layer.ranknum[name]
        rank_scale = layer.lora_E[name].reshape(-1) * (layer.scaling[name] / (ranknum + 1e-5))
        return layer.lora_A[name], layer.lora_B[name], 1.0, rank_scale
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]), None


# ---------------------------------------------------------------------------------------------------------------
# The fused forward of one layer.
# ---------------------------------------------------------------------------------------------------------------


def _fused_adapters(layer: nn.Module, x: Tensor, names: list[str]) -> Tensor | None:
    """``x W0^T + bias + sum over names of each adapter's term`` on the fused ops, or None where a call needs
    peft's forward (the caller runs it). names: the active adapters this layer holds (at least one)."""
    weight, bias = _base_weight(layer)
    if x.dtype != weight.dtype or x.device != weight.device or not x.is_floating_point():
        return None
    if any(_adapter_problem(layer, n) is not None for n in names):
        return None

    def cast(t: Tensor | None) -> Tensor | None:  # float32 adapters on a half base: differentiable, per call
        return t if t is None or t.dtype == x.dtype else t.to(x.dtype)

    if len(names) == 1:
        name = names[0]
        p = _dropout_p(layer, name)
        if _is_dora(layer, name):
            magnitude = cast(layer.lora_magnitude_vector[name].weight)
            A, B = cast(layer.lora_A[name].weight), cast(layer.lora_B[name].weight)
            return dora_linear(x, weight, bias, A, B, magnitude, scale=float(layer.scaling[name]), dropout=p)
        A, B, scale, rank_scale = _low_rank_term(layer, name)
        return lora_linear(x, weight, bias, cast(A), cast(B), scale=scale, rank_scale=cast(rank_scale), dropout=p)
    # Several adapters at once: one fused call on the adapters stacked along the rank, each rank carrying its own
    # adapter's scale (torch.cat is differentiable, so every adapter's parameters get their gradients).
    if any(_is_dora(layer, n) for n in names) or any(_dropout_p(layer, n) > 0.0 for n in names):
        return None  # peft feeds a DoRA adapter the previous adapters' sum; our dropout draws one mask per call
    terms = [_low_rank_term(layer, n) for n in names]
    A = torch.cat([t[0] for t in terms])
    B = torch.cat([t[1] for t in terms], dim=1)
    rank_scale = torch.cat([t[2] * (t[0].new_ones(t[0].shape[0]) if t[3] is None else t[3]) for t in terms])
    return lora_linear(x, weight, bias, cast(A), cast(B), scale=1.0, rank_scale=cast(rank_scale))


# ---------------------------------------------------------------------------------------------------------------
# peft's ``adapter_names=`` mixed batch: one multi-adapter gather call over the adapters the batch names.
# ---------------------------------------------------------------------------------------------------------------


class _StackedAdapters:
    """What ``multi_lora_linear`` and ``AdapterBatch.build`` read of a pool (``modules.pool.AdapterPool``'s
    duck-typed interface), holding the adapters one mixed batch names, stacked from peft's parameters for this call:
    ``lora_A [n, r_max, K]``, ``lora_B [n, N, r_max]`` (zero past each adapter's rank). Built per call by
    differentiable ops, so peft's parameters get their gradients and an in-place update is seen by the next call."""

    untargeted: frozenset = frozenset()  # rows of adapters a layer lacks are given slot -1 before the batch is built
    names: dict = {}

    def __init__(self, lora_A: Tensor, lora_B: Tensor, slots: tuple, constants: tuple[Tensor, Tensor]) -> None:
        self.lora_A, self.lora_B, self.slots = lora_A, lora_B, slots
        self.capacity, self.in_features, self.out_features = len(slots), lora_A.shape[2], lora_B.shape[1]
        self.dora_slots, self.magnitude_scale = constants  # no DoRA: peft refuses DoRA in mixed batches
        self.signature = (self.capacity, slots, (), ())

    dtype = property(lambda self: self.lora_A.dtype)
    device = property(lambda self: self.lora_A.device)

    def __contains__(self, name: object) -> bool:
        return False


def _slot_alpha(scale: float, rank: int) -> float:
    """An alpha whose ``alpha / rank`` (the batch's per-row scale) is peft's ``scaling`` (which may come from rsLoRA,
    alpha_pattern or set_scale, so it is matched, not re-derived): to the bit where one exists (always for peft's
    ``lora_alpha / r``), else within one ulp (not every double is some double divided by 3)."""
    guess = scale * rank
    for alpha in (guess, math.nextafter(guess, math.inf), math.nextafter(guess, -math.inf)):
        if adapter_scale(alpha, rank) == scale:
            return alpha
    return guess


_BATCHES: OrderedDict = OrderedDict()  # (slots, dtype, device, ids, seq_lens, N) -> (batch, dora_slots, g)
_MAX_BATCHES = 32  # the layers of one forward share an entry; decode steps of several shapes stay cached


def _batch_for(slots: tuple, dtype: torch.dtype, device: torch.device, ids: tuple, seq_lens: int | None, N: int):
    """(AdapterBatch, dora_slots, magnitude_scale) for these slots and row ids, cached: metadata only (slots, ranks,
    scales, row grouping), a pure function of the key, so it is never stale; the weights are never cached."""
    key = (slots, dtype, device, ids, seq_lens, N)
    hit = _BATCHES.get(key)
    if hit is not None:
        _BATCHES.move_to_end(key)
        return hit
    n = len(slots)
    dora_slots = torch.zeros(n, dtype=torch.int32, device=device)
    magnitude_scale = torch.ones(n, N, dtype=torch.promote_types(dtype, torch.float32), device=device)
    shape_only = _StackedAdapters(torch.empty(n, 1, 1, dtype=dtype, device=device),
                                  torch.empty(n, N, 1, dtype=dtype, device=device), slots,
                                  (dora_slots, magnitude_scale))  # fmt: skip
    hit = (AdapterBatch.build(shape_only, list(ids), seq_lens=seq_lens), dora_slots, magnitude_scale)
    _BATCHES[key] = hit
    if len(_BATCHES) > _MAX_BATCHES:
        _BATCHES.popitem(last=False)
    return hit


def _gather_mixed_batch(layer: nn.Module, x: Tensor, adapter_names: list[str], used: list[str]) -> Tensor:
    """One ``multi_lora_linear`` call (the gather kernel on a GPU, its torch reference on a CPU) over the adapters in
    ``used`` (LoRA / rsLoRA, no dropout), stacked from peft's parameters per call."""
    weight, bias = _base_weight(layer)
    slots, As, Bs = [], [], []
    for name in used:
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        slots.append(SlotInfo(A.shape[0], _slot_alpha(float(layer.scaling[name]), A.shape[0]), False, False))
        As.append(A if A.dtype == x.dtype else A.to(x.dtype))  # float32 adapters on a half base: cast per call
        Bs.append(B if B.dtype == x.dtype else B.to(x.dtype))
    r_max = max(s.rank for s in slots)
    lora_A = torch.stack([nn.functional.pad(A, (0, 0, 0, r_max - A.shape[0])) for A in As])
    lora_B = torch.stack([nn.functional.pad(B, (0, r_max - B.shape[1])) for B in Bs])
    slot_of = {name: i for i, name in enumerate(used)}
    ids = tuple(slot_of.get(name, NO_ADAPTER) for name in adapter_names)  # "__base__", or absent here: the base
    seq_lens = None if x.dim() == 2 else math.prod(x.shape[1:-1])  # every sequence's rows, contiguous in x
    batch, dora_slots, magnitude_scale = _batch_for(tuple(slots), x.dtype, x.device, ids, seq_lens, weight.shape[0])
    pool = _StackedAdapters(lora_A, lora_B, tuple(slots), (dora_slots, magnitude_scale))
    return multi_lora_linear(x, weight, bias, pool, batch)


def _mixed_batch(layer: nn.Module, x: Tensor, adapter_names: list[str]) -> Tensor | None:
    """peft's ``adapter_names=`` forward (row i of x, along dim 0, uses adapter ``adapter_names[i]``; "__base__" or a
    name this layer lacks: the base alone) on one multi-adapter gather call; None: peft's forward runs (and raises
    where peft raises: AdaLoRA's layers take no ``adapter_names``)."""
    weight, bias = _base_weight(layer)
    if x.dtype != weight.dtype or x.device != weight.device or not x.is_floating_point() or x.dim() < 2:
        return None
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return None
    if _is_adalora(layer):
        return None  # peft's SVDLinear.forward has no mixed batch: it passes adapter_names to the base and fails
    used = [n for n in dict.fromkeys(adapter_names) if n != "__base__" and n in layer.lora_A.keys()]
    if any(_adapter_problem(layer, n) is not None or _is_dora(layer, n) for n in used):
        return None
    if not used:
        return nn.functional.linear(x, weight, bias)
    trains_base = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if trains_base or torch.compiler.is_compiling() or any(_dropout_p(layer, n) > 0.0 for n in used):
        # the gather op keeps W0 frozen and draws one dropout mask for every row: one fused call per adapter
        return _mixed_batch_per_adapter(layer, x, adapter_names)
    return _gather_mixed_batch(layer, x, adapter_names, used)


def _mixed_batch_per_adapter(layer: nn.Module, x: Tensor, adapter_names: list[str]) -> Tensor | None:
    """The mixed batch as rows grouped by adapter, one fused ``lora_linear`` call per group (peft's dropout per
    adapter; gradients for a trainable base); None: peft's forward runs."""
    weight, bias = _base_weight(layer)
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        rows_of.setdefault(name, []).append(i)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for name, rows in rows_of.items():
        index = torch.tensor(rows, device=x.device)
        if name != "__base__" and name in layer.lora_A.keys():
            rows_out = _fused_adapters(layer, x[index], [name])
            if rows_out is None:
                return None
            out[index] = rows_out
        else:
            out[index] = nn.functional.linear(x[index], weight, bias)
    return out


def _patched_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    """The instance forward of a patched layer: the fused ops where they give peft's numbers, else peft's forward."""
    peft_forward = getattr(layer, PATCH_ATTR)["peft_forward"]
    adapter_names = kwargs.get("adapter_names")
    extra = {k: v for k, v in kwargs.items() if k != "adapter_names" and v is not None}
    plain = not args and not extra and not layer.disable_adapters and not layer.merged
    if plain and not torch.is_autocast_enabled(x.device.type):
        if adapter_names is not None:
            layer._check_forward_args(x, adapter_names=adapter_names)  # peft's own errors (lengths, DoRA, merged)
            out = _mixed_batch(layer, x, adapter_names)
        else:
            names = [n for n in layer.active_adapters if n in layer.lora_A.keys()]
            out = _fused_adapters(layer, x, names) if names else None
        if out is not None:
            return out
    return peft_forward(x, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------


def _adapter_kinds(layer: nn.Module) -> str:
    if _is_adalora(layer):
        return "adalora"
    kinds = {"dora" if _is_dora(layer, n) else ("rslora" if layer.use_rslora.get(n) else "lora") for n in layer.lora_A}
    return "+".join(sorted(kinds))


def patch_peft_model(model: nn.Module) -> PeftPatchReport:
    """Make every supported peft LoRA / rsLoRA / DoRA / AdaLoRA layer inside ``model`` run on the fused ops, in place.

    model: a ``peft.PeftModel`` or any module with peft tuner layers inside. Returns a ``PeftPatchReport`` naming the
    patched layers and, for every other peft layer, why it keeps peft's forward. Patching twice is a no-op (the
    layers already patched are reported as patched); ``unpatch_peft_model`` restores peft's forward exactly.
    """
    _, _, base_tuner_layer = _peft_layer_types()
    report = PeftPatchReport()
    for module_name, module in model.named_modules():
        if not isinstance(module, base_tuner_layer):
            continue
        problem = _layer_problem(module)
        if problem is None:
            problem = next(filter(None, (_adapter_problem(module, n) for n in module.lora_A.keys())), None)
        if problem is not None:
            report.unpatched[module_name] = problem
            continue
        if not hasattr(module, PATCH_ATTR):
            # peft's forward as the instance had it: the class's, or an instance forward someone set before us
            state = {"own_forward": module.__dict__.get("forward"), "peft_forward": module.forward}
            object.__setattr__(module, PATCH_ATTR, state)
            module.forward = types.MethodType(_patched_forward, module)
        report.patched[module_name] = _adapter_kinds(module)
    return report


def unpatch_peft_model(model: nn.Module) -> list[str]:
    """Give every layer ``patch_peft_model`` patched its peft forward back (the same function object); returns the
    names of the layers restored."""
    restored = []
    for module_name, module in model.named_modules():
        state = module.__dict__.get(PATCH_ATTR)
        if state is None:
            continue
        del module.forward
        if state["own_forward"] is not None:
            module.forward = state["own_forward"]
        object.__delattr__(module, PATCH_ATTR)
        restored.append(module_name)
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``patch_peft_model`` patched this peft layer."""
    return PATCH_ATTR in module.__dict__


# ---------------------------------------------------------------------------------------------------------------
# peft configs for inject_adapters: ``inject_adapters(model, peft.LoraConfig(...))``.
# ---------------------------------------------------------------------------------------------------------------


def is_peft_config(obj) -> bool:
    """A peft ``LoraConfig`` / ``AdaLoraConfig`` (any ``PeftConfig``), recognised without importing peft."""
    return hasattr(obj, "peft_type") and callable(getattr(obj, "to_dict", None))


def inject_arguments(config) -> dict:
    """``inject_adapters`` keyword arguments that build what ``peft.inject_adapter_in_model(config, model)`` builds
    (LoRA, rsLoRA, DoRA, AdaLoRA; target selection, bias, modules_to_save, per-layer patterns), plus
    ``inference_mode``. ValueError naming, in words, every config field that would give other numbers than peft's
    (the same rules ``load_peft_adapter`` applies to an adapter file), and the initialisations we do not draw."""
    from pathlib import Path

    from .peft_compat import _config_kind  # one list of supported peft fields, shared with the adapter loader

    fields = config.to_dict()
    what = type(config).__name__
    try:
        kind = _config_kind(fields, Path(what))
    except ValueError as e:  # drop the loader's file path from the message: this is a config object
        raise ValueError(f"{what}: {str(e).split(': ', 1)[1]}") from None
    if fields.get("init_lora_weights", True) is not True:
        raise ValueError(f"{what}: init_lora_weights={fields['init_lora_weights']!r} is not supported by "
                         "inject_adapters, which initialises as peft's default (init_lora_weights=True: A random, "
                         "B zero)")  # fmt: skip
    arguments = dict(
        target_modules=fields["target_modules"], exclude_modules=fields.get("exclude_modules"), method=kind,
        alpha=float(fields.get("lora_alpha", 8)), dropout=float(fields.get("lora_dropout") or 0.0),
        bias=fields.get("bias", "none"), modules_to_save=fields.get("modules_to_save") or None,
        layers_to_transform=fields.get("layers_to_transform"), layers_pattern=fields.get("layers_pattern"),
        task_type=None if fields.get("task_type") is None else str(fields["task_type"]),
    )  # fmt: skip
    if kind == "adalora":
        if fields.get("rank_pattern"):
            raise ValueError(f"{what}: rank_pattern is a trained AdaLoRA's allocation; load that adapter with "
                             "load_peft_adapter instead")  # fmt: skip
        arguments.update(r=int(fields.get("init_r", 12)))
    else:
        arguments.update(r=int(fields.get("r", 8)), rslora=bool(fields.get("use_rslora", False)),
                         rank_pattern=fields.get("rank_pattern") or None,
                         alpha_pattern=fields.get("alpha_pattern") or None)  # fmt: skip
    arguments["inference_mode"] = bool(fields.get("inference_mode", False))
    return arguments
