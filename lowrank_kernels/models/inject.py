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
The base layers wrapped: ``nn.Linear`` itself and transformers' ``Conv1D`` (GPT-2, weight [in, out]); any other match
(an ``nn.Embedding``, an ``nn.Linear`` subclass with its own forward such as a quantised layer) raises a ``TypeError``
naming it before the model changes. peft's other selection fields: ``layers_to_transform`` / ``layers_pattern`` keep, of
the modules a *list* entry matches as a suffix (not a regex, not an exact full name, so not "all-linear"), those whose
first numbered path segment (after ``layers_pattern``) is a listed index; ``modules_to_save`` names (peft:
``name.endswith(entry)``) are never targets and get a trainable copy (``ModulesToSave``, peft's ``ModulesToSaveWrapper``
layout).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Iterator, Mapping

from torch import nn

from ..modules.adalora import AdaLoRALinear
from ..modules.dora import DoRALinear
from ..modules.lora import LoRALinear, Quantized4bitBase, is_conv1d, is_linear4bit, linear_layout
from ..modules.multi_lora import MultiLoRALinear

__all__ = [
    "ADAPTER_LAYERS",
    "ModulesToSave",
    "adapter_layers",
    "find_target_modules",
    "inject_adapters",
    "inject_multi_lora",
    "model_modules",
    "modules_to_save_names",
    "multi_lora_from",
    "pattern_value",
    "remove_adapters",
    "select_modules",
]

ALL_LINEAR = "all-linear"
METHODS = ("lora", "dylora", "dora", "adalora")  # dylora: a LoRALinear trained with a sampled rank
BIAS_MODES = ("none", "all", "lora_only")  # peft's LoraConfig.bias
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # peft: the head "all-linear" skips on a SEQ_CLS model
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


def _output_layer(model: nn.Module, task_type: str | None = None) -> nn.Module | None:
    """The layer "all-linear" skips: the output embeddings, else (a SEQ_CLS model) the classifier head, as peft."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    if output is None and task_type == "SEQ_CLS":
        output = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if getattr(model, n, None) is not None), None)
    return output


def _layer_index_kept(name: str, layers_to_transform, layers_pattern) -> bool:
    """peft's ``layers_to_transform`` test: the first numbered segment (after ``layers_pattern``) is listed."""
    if layers_to_transform is None or (isinstance(layers_to_transform, list) and not layers_to_transform):
        return True
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def _saved_by(modules_to_save, name: str) -> bool:
    """Inside a ``modules_to_save`` module (peft: never a target, ``(^|.*\\.)m($|\\..*)``)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


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
    model: nn.Module,
    target_modules: Targets,
    exclude_modules: Targets | None = None,
    *,
    layers_to_transform: int | Collection[int] | None = None,
    layers_pattern: str | Collection[str] | None = None,
    modules_to_save: Collection[str] | None = None,
    task_type: str | None = None,
) -> list[tuple[str, nn.Module]]:
    """The modules (any type) that peft's rules select; ``"all-linear"``: ``nn.Linear``, ``Conv1D`` and adapter
    layers, without the output layer (or a SEQ_CLS model's head). No type checks and no error when nothing matches
    (``find_target_modules`` adds those)."""
    _check_targets("target_modules", target_modules)
    if exclude_modules is not None:
        _check_targets("exclude_modules", exclude_modules)
    all_linear = _is_all_linear(target_modules)
    output_layer = _output_layer(model, task_type) if all_linear else None
    selected = []
    for name, module in model_modules(model):
        if exclude_modules is not None and _name_matches(exclude_modules, name):
            continue
        if _saved_by(modules_to_save, name):
            continue
        if all_linear:
            linear = isinstance(module, (nn.Linear, *ADAPTER_LAYERS)) or is_conv1d(module)
            if not linear or module is output_layer:
                continue
        elif not _name_matches(target_modules, name):
            continue
        # peft applies layers_to_transform only to a list entry matched as a suffix: not to a regex, not to an
        # exact full name, so not to "all-linear" either (which peft expands to full names)
        by_layer = not isinstance(target_modules, str) and name not in target_modules
        if by_layer and not _layer_index_kept(name, layers_to_transform, layers_pattern):
            continue
        selected.append((name, module))
    return selected


def _why_not_wrappable(module: nn.Module) -> str | None:
    """None for a base layer the adapters wrap, else why not, in words."""
    if isinstance(module, nn.Embedding):
        return "LoRA on an nn.Embedding is not supported (only nn.Linear and transformers Conv1D layers)"
    try:
        linear_layout(module)
    except TypeError as exc:
        return str(exc)
    return None


def find_target_modules(
    model: nn.Module, target_modules: Targets, exclude_modules: Targets | None = None, **selection
) -> list[str]:
    """Qualified names of the ``nn.Linear`` / ``Conv1D`` modules of ``model`` that ``target_modules`` selects (peft's
    rules, module docstring; ``selection``: ``select_modules``'s keyword fields). ``"all-linear"`` skips layers
    that already have an adapter; a name or regex that selects one raises.

    Raises ``ValueError`` when nothing matches and ``TypeError`` naming the module and its class when a match is a
    module no adapter layer can wrap (an ``nn.Embedding``, an ``nn.Linear`` subclass with its own ``forward``...).
    """
    all_linear = _is_all_linear(target_modules)
    names = []
    for name, module in select_modules(model, target_modules, exclude_modules, **selection):
        if isinstance(module, ADAPTER_LAYERS):
            if all_linear:
                continue
            raise ValueError(f"module {name!r} already has an adapter ({type(module).__name__})")
        why = _why_not_wrappable(module)
        if why is not None:
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; only nn.Linear and transformers "
                            f"Conv1D can be wrapped: {why}")  # fmt: skip
        names.append(name)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in {type(model).__name__}")
    return names


class ModulesToSave(nn.Module):
    """A trainable copy of a module (peft's ``ModulesToSaveWrapper`` for one adapter): ``original_module`` (frozen,
    the module itself) and ``modules_to_save.<adapter>`` (a deep copy, trainable) that the forward runs. The state-dict
    keys are peft's; attributes not found here are read from the copy (e.g. DeBERTa's ``pooler.output_dim``)."""

    def __init__(self, module: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({adapter_name: copy.deepcopy(module)})
        self.adapter_name = adapter_name
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trainable_copy.parameters():
            p.requires_grad_(True)

    @property
    def trainable_copy(self) -> nn.Module:
        return self.modules_to_save[self.adapter_name]

    def forward(self, *args, **kwargs):
        return self.trainable_copy(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "adapter_name"):
                raise
            return getattr(self.trainable_copy, name)


def modules_to_save_names(model: nn.Module, modules_to_save: Collection[str] | None) -> list[str]:
    """The modules peft wraps for ``modules_to_save`` (``name.endswith(entry)``), outermost only, none twice."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, ModulesToSave) or any(name.startswith(f"{n}.") for n in names):
            continue
        if any(name.endswith(m) for m in modules_to_save or ()):
            names.append(name)
    return names


def _freeze_all_but_adapters(model: nn.Module, bias: str = "none") -> None:
    """peft's ``_mark_only_adapters_as_trainable``: adapters train; ``bias="all"``: every parameter named ``*.bias``
    too, ``"lora_only"``: the biases of the adapter layers; a ``ModulesToSave`` copy trains, its original does not."""
    for name, p in model.named_parameters():
        is_bias = name == "bias" or name.endswith(".bias")
        p.requires_grad_(any(part in _TRAINABLE for part in name.split(".")) or (bias == "all" and is_bias))
    if bias == "lora_only":
        for _, layer in adapter_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            for p in module.original_module.parameters():
                p.requires_grad_(False)
            for p in module.trainable_copy.parameters():
                p.requires_grad_(True)


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
    *,
    bias: str = "none",
    modules_to_save: Collection[str] | None = None,
    layers_to_transform: int | Collection[int] | None = None,
    layers_pattern: str | Collection[str] | None = None,
    task_type: str | None = None,
) -> list[str]:
    """Wrap the selected ``nn.Linear`` / ``Conv1D`` modules of ``model`` in place and freeze every other parameter.

    peft's fields, same meaning: ``bias`` ("none", "all": every bias trains, "lora_only": the wrapped layers' biases
    train), ``modules_to_save`` (each matching module gets a trainable ``ModulesToSave`` copy and is never a
    target), ``layers_to_transform`` / ``layers_pattern`` (module docstring), ``task_type`` ("SEQ_CLS": "all-linear"
    skips the classifier head).

    method: ``"lora"`` / ``"dylora"`` (``LoRALinear``; DyLoRA then trains it with ``RankSampler``), ``"dora"``
    (``DoRALinear``) or ``"adalora"`` (``AdaLoRALinear``, ``r`` is peft's ``init_r``; no rsLoRA). Per-layer ``r`` and
    ``alpha`` from ``rank_pattern`` / ``alpha_pattern`` (peft's semantics). The wrapped layers share the original
    weights (no copy). Returns the qualified names of the wrapped modules.

    ``target_modules`` may instead be a peft ``LoraConfig`` / ``AdaLoraConfig`` (then no other argument): the model
    gets what ``peft.inject_adapter_in_model`` would build, or a ValueError naming what we do not support.
    """
    from .peft_patch import inject_arguments, is_peft_config  # peft's configs, read without importing peft here

    if is_peft_config(target_modules):
        given = dict(method=method, r=r, alpha=alpha, dropout=dropout, rslora=rslora, rank_pattern=rank_pattern,
                     alpha_pattern=alpha_pattern, exclude_modules=exclude_modules, bias=bias,
                     modules_to_save=modules_to_save, layers_to_transform=layers_to_transform,
                     layers_pattern=layers_pattern, task_type=task_type)  # fmt: skip
        if given != DEFAULT_INJECT_ARGUMENTS:
            raise TypeError("inject_adapters(model, peft_config) takes its settings from the config; pass no others")
        arguments = inject_arguments(target_modules)
        inference_mode = arguments.pop("inference_mode")
        names = inject_adapters(model, **arguments)
        if inference_mode:  # peft's inference_mode: adapters built frozen
            model.requires_grad_(False)
        return names
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "adalora" and rslora:
        raise ValueError("rslora is not defined for AdaLoRA (its scale is alpha / ranknum)")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    names = find_target_modules(model, target_modules, exclude_modules, layers_to_transform=layers_to_transform,
                                layers_pattern=layers_pattern, modules_to_save=modules_to_save,
                                task_type=task_type)  # fmt: skip
    saved = modules_to_save_names(model, modules_to_save)

    def build(name: str, linear: nn.Linear) -> nn.Module:
        layer_r = pattern_value(rank_pattern, name, r)
        layer_alpha = pattern_value(alpha_pattern, name, alpha)
        if method == "adalora":
            return AdaLoRALinear.from_linear(linear, layer_r, alpha=layer_alpha, dropout=dropout)
        cls = DoRALinear if method == "dora" else LoRALinear
        return cls.from_linear(linear, layer_r, alpha=layer_alpha, dropout=dropout, rslora=rslora)

    _swap_in(model, names, build)
    for name in saved:
        model.set_submodule(name, ModulesToSave(model.get_submodule(name)))
    _freeze_all_but_adapters(model, bias)
    return names


DEFAULT_INJECT_ARGUMENTS = dict(method="lora", r=8, alpha=8.0, dropout=0.0, rslora=False, rank_pattern=None,
                                alpha_pattern=None, exclude_modules=None, bias="none", modules_to_save=None,
                                layers_to_transform=None, layers_pattern=None, task_type=None)  # fmt: skip


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
    _swap_in(model, names, lambda name, linear: multi_lora_from(linear, capacity, max_rank))
    return names


def multi_lora_from(layer: nn.Module, capacity: int, max_rank: int) -> MultiLoRALinear:
    """``MultiLoRALinear.from_linear`` for an ``nn.Linear`` or a ``Conv1D``: a Conv1D's [in, out] weight is handed
    over as an [out, in] Parameter that is a transposed view of the same storage (no copy); ``remove_adapters``
    puts the Conv1D itself back."""
    if is_linear4bit(layer):
        raise TypeError(f"{type(layer).__name__}: serving adapters on a bitsandbytes 4-bit base is not supported "
                        "(MultiLoRALinear needs a dense weight)")  # fmt: skip
    if not is_conv1d(layer):
        return MultiLoRALinear.from_linear(layer, capacity, max_rank)
    in_features, out_features, _ = linear_layout(layer)
    view = nn.Linear(in_features, out_features, bias=layer.bias is not None, device="meta")
    view.weight = nn.Parameter(layer.weight.detach().t(), requires_grad=False)  # shares the Conv1D's storage
    view.bias = layer.bias
    multi = MultiLoRALinear.from_linear(view, capacity, max_rank)
    layer.weight.requires_grad_(False)
    object.__setattr__(multi, "_conv1d_base", layer)  # not a submodule: no second copy in the state dict
    return multi


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every adapter layer of ``model`` (``LoRALinear``, ``DoRALinear``, ``AdaLoRALinear``, ``MultiLoRALinear``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)]


def remove_adapters(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every adapter layer by a plain ``nn.Linear`` (``Conv1D``) holding the same weight and bias tensors.

    ``merge=True`` folds each training adapter into the weight first (peft's ``merge_and_unload``: a
    ``ModulesToSave`` becomes its trained copy); otherwise a merged layer is unmerged, so the model gets its original
    weights back (peft's ``unload``: a ``ModulesToSave`` becomes its original module). The base parameters stay
    frozen. Returns the names of the replaced adapter layers.
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
        if name:
            model.set_submodule(name, _plain_layer(layer))
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            model.set_submodule(name, module.trainable_copy if merge else module.original_module)
    return [name for name, _ in layers]


def _plain_layer(layer: nn.Module) -> nn.Module:
    """The base layer type an adapter layer wrapped, holding its weight and bias Parameters (no copy)."""
    conv1d = getattr(layer, "_conv1d_base", None)  # a MultiLoRALinear built by multi_lora_from
    if conv1d is not None:
        return conv1d
    if isinstance(layer, Quantized4bitBase):  # the bitsandbytes layer itself, packed weight and all
        return layer.base_layer
    if getattr(layer, "fan_in_fan_out", False):
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = layer.out_features, layer.in_features
        conv.weight, conv.bias = layer.weight, layer.bias
        return conv
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear
