"""Adapters into any model: wrap the ``nn.Linear`` modules chosen by name, freeze the rest, and take them out again.

Module selection follows peft's rules (``LoraConfig.target_modules``), so a peft config's fields mean the same here:

* a list of names: a module matches if its qualified name equals an entry or ends with ``"." + entry``
  (``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``);
* a string: a regular expression that must match the whole qualified name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear`` except the model's output layer (``get_output_embeddings()``, e.g.
  ``lm_head``), as peft does;
* ``exclude_modules`` (list or regex, same rules) removes matches; ``rank_pattern`` / ``alpha_pattern`` map a
  regex ``key`` to a per-layer ``r`` / ``alpha``, matched as peft does: ``(.*\\.)?(key)$`` on the qualified name,
  first key in the mapping's order wins.

Modules inside an adapter layer (its ``lora_A`` / ``lora_B``) are never targets, so injecting twice cannot nest.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping

from torch import nn

from ..modules.adalora import AdaLoRALinear
from ..modules.dora import DoRALinear
from ..modules.lora import LoRALinear
from ..modules.multi_lora import MultiLoRALinear

__all__ = [
    "ADAPTER_LAYERS",
    "adapter_layers",
    "find_target_modules",
    "inject_adapters",
    "inject_multi_lora",
    "model_modules",
    "pattern_value",
    "remove_adapters",
    "select_modules",
]

ALL_LINEAR = "all-linear"
METHODS = ("lora", "dylora", "dora", "adalora")  # dylora: a LoRALinear trained with a sampled rank
ADAPTER_LAYERS = (LoRALinear, AdaLoRALinear, MultiLoRALinear)  # DoRALinear is a LoRALinear
_TRAINABLE = ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector")

Targets = str | Collection[str]  # peft's configs hold lists, or sets after __post_init__


def _is_all_linear(targets: Targets) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def _name_matches(targets: Targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def pattern_value(patterns: Mapping[str, object] | None, name: str, default):
    """peft's ``get_pattern_key``: the value of the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_targets(arg: str, targets) -> None:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValueError(f"{arg} {targets!r} is not a valid regular expression ({exc})") from None
    elif not isinstance(targets, Collection) or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"{arg} must be a regex string, 'all-linear' or a list of module names, got {targets!r}")


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the root and without the modules inside adapter layers (their ``lora_A`` /
    ``lora_B``): the names the unwrapped model has, which is what peft matches its patterns against."""
    inside_adapters: set[str] = set()
    for name, module in model.named_modules():
        if not name or name in inside_adapters:
            continue
        if isinstance(module, ADAPTER_LAYERS):
            inside_adapters.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
        yield name, module


def select_modules(
    model: nn.Module, target_modules: Targets, exclude_modules: Targets | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules (any type) that peft's rules select; ``"all-linear"``: ``nn.Linear`` and adapter layers, without
    the output layer. No type checks and no error when nothing matches (``find_target_modules`` adds those)."""
    _check_targets("target_modules", target_modules)
    if exclude_modules is not None:
        _check_targets("exclude_modules", exclude_modules)
    all_linear = _is_all_linear(target_modules)
    output_layer = _output_layer(model) if all_linear else None
    selected = []
    for name, module in model_modules(model):
        if exclude_modules is not None and _name_matches(exclude_modules, name):
            continue
        if all_linear:
            if isinstance(module, (nn.Linear, *ADAPTER_LAYERS)) and module is not output_layer:
                selected.append((name, module))
        elif _name_matches(target_modules, name):
            selected.append((name, module))
    return selected


def find_target_modules(model: nn.Module, target_modules: Targets, exclude_modules: Targets | None = None) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules of ``model`` that ``target_modules`` selects (peft's rules, module
    docstring). ``"all-linear"`` skips layers that already have an adapter; a name or regex that selects one raises.

    Raises ``ValueError`` when nothing matches and ``TypeError`` when a match is not an ``nn.Linear``.
    """
    all_linear = _is_all_linear(target_modules)
    names = []
    for name, module in select_modules(model, target_modules, exclude_modules):
        if isinstance(module, ADAPTER_LAYERS):
            if all_linear:
                continue
            raise ValueError(f"module {name!r} already has an adapter ({type(module).__name__})")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; only nn.Linear can be wrapped")
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in {type(model).__name__}")
    return names


def _freeze_all_but_adapters(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in _TRAINABLE for part in name.split(".")))


def inject_adapters(
    model: nn.Module,
    target_modules: Targets,
    method: str = "lora",
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    exclude_modules: Targets | None = None,
) -> list[str]:
    """Wrap the selected ``nn.Linear`` modules of ``model`` in place and freeze every other parameter.

    method: ``"lora"`` / ``"dylora"`` (``LoRALinear``; DyLoRA then trains it with ``RankSampler``), ``"dora"``
    (``DoRALinear``) or ``"adalora"`` (``AdaLoRALinear``, ``r`` is peft's ``init_r``; no rsLoRA). Per-layer ``r`` and
    ``alpha`` from ``rank_pattern`` / ``alpha_pattern`` (peft's semantics). The wrapped layers share the original
    weights (no copy). Returns the qualified names of the wrapped modules.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "adalora" and rslora:
        raise ValueError("rslora is not defined for AdaLoRA (its scale is alpha / ranknum)")
    names = find_target_modules(model, target_modules, exclude_modules)

    def build(name: str, linear: nn.Linear) -> nn.Module:
        layer_r = pattern_value(rank_pattern, name, r)
        layer_alpha = pattern_value(alpha_pattern, name, alpha)
        if method == "adalora":
            return AdaLoRALinear.from_linear(linear, layer_r, alpha=layer_alpha, dropout=dropout)
        cls = DoRALinear if method == "dora" else LoRALinear
        return cls.from_linear(linear, layer_r, alpha=layer_alpha, dropout=dropout, rslora=rslora)

    _swap_in(model, names, build)
    _freeze_all_but_adapters(model)
    return names


def _swap_in(model: nn.Module, names: list[str], build) -> None:
    """Build every layer (``build(name, linear)``) before swapping any in, so that a bad r, alpha or capacity leaves
    the model untouched: ``from_linear`` freezes the weight it wraps, so the flags are put back on failure."""
    linears = [(name, model.get_submodule(name)) for name in names]
    flags = [(p, p.requires_grad) for _, linear in linears for p in linear.parameters()]
    layers = []
    try:
        for name, linear in linears:
            try:
                layers.append((name, build(name, linear)))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"module {name!r}: {exc}") from None
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for name, layer in layers:
        model.set_submodule(name, layer)


def inject_multi_lora(
    model: nn.Module, target_modules: Targets, capacity: int, max_rank: int, exclude_modules: Targets | None = None
) -> list[str]:
    """Wrap the selected ``nn.Linear`` modules in ``MultiLoRALinear`` (an empty pool each, for serving) in place."""
    names = find_target_modules(model, target_modules, exclude_modules)
    _swap_in(model, names, lambda name, linear: MultiLoRALinear.from_linear(linear, capacity, max_rank))
    return names


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every adapter layer of ``model`` (``LoRALinear``, ``DoRALinear``, ``AdaLoRALinear``, ``MultiLoRALinear``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]


def remove_adapters(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every adapter layer by a plain ``nn.Linear`` holding the same weight and bias tensors.

    ``merge=True`` folds each training adapter into the weight first (peft's ``merge_and_unload``); otherwise a merged
    layer is unmerged, so the model gets its original weights back (peft's ``unload``). The base parameters stay
    frozen. Returns the names of the replaced modules.
    """
    if isinstance(model, ADAPTER_LAYERS):
        raise TypeError(f"model is itself a {type(model).__name__}: merge() it or take its .weight; remove_adapters "
                        "replaces adapter layers inside a model")  # fmt: skip
    layers = adapter_layers(model)
    if merge and any(isinstance(m, MultiLoRALinear) for _, m in layers):
        raise ValueError("merge=True: a MultiLoRALinear holds many adapters and cannot be merged into one weight")
    for name, layer in layers:
        if not isinstance(layer, MultiLoRALinear) and layer.merged != merge:
            layer.merge() if merge else layer.unmerge()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias
        if name:
            model.set_submodule(name, linear)
    return [name for name, _ in layers]
