"""peft's adapter files in and out, without importing peft.

``load_peft_adapter`` wraps a plain model (the base model the adapter was trained on, e.g. a transformers
``LlamaForCausalLM``) with ``inject_adapters`` as the adapter's ``adapter_config.json`` says and loads
``adapter_model.safetensors`` into it; ``save_peft_adapter`` writes a model wrapped by ``inject_adapters`` in the same
format, so ``peft.PeftModel.from_pretrained(base_model, path)`` loads it; ``load_peft_adapters_for_serving`` puts
several peft adapters into the pools of ``MultiLoRALinear`` layers, one name each, for mixed batches.

The format, as peft 0.21 writes it (checked against ``PeftModel.save_pretrained``). Tensor keys are
``base_model.model.<module>.<param>`` with ``<module>`` the qualified name in the base model, and ``<param>``:

* ``LORA``: ``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]; with ``use_dora`` also ``lora_magnitude_vector``
  [out] (no ``.weight``: peft's live module calls it ``lora_magnitude_vector.<adapter>.weight``). These are the
  parameter names of ``LoRALinear`` / ``DoRALinear``.
* ``ADALORA``: ``lora_A`` [k, in] (Q), ``lora_B`` [out, k] (P), ``lora_E`` [k, 1] (lambda); ``ranknum`` is not
  saved (peft sets it to ``init_r``; a file from an older peft that has it is honoured). Without ``rank_pattern``,
  k = ``init_r``. After AdaLoRA's final allocation the config has ``rank_pattern = {"<module>.lora_E": [kept?] *
  init_r}`` and the file holds only the kept triplets (k = the kept count), while peft's ``ranknum`` stays
  ``init_r`` (scale ``lora_alpha / init_r``). Loaded here into ``AdaLoRALinear(r=init_r)`` with the kept triplets at
  their positions, the masked ones zero and masked (``set_triplet_mask``; ``compact()`` for inference).
* ``modules_to_save`` (e.g. every ``task_type="SEQ_CLS"`` adapter's head): the trained copy's own state dict under
  the module's name, ``base_model.model.<module>.<key>`` (no ``modules_to_save.<adapter>``).
* ``bias="all"``: every ``*.bias`` of peft's live model under its live name (a wrapped layer's as
  ``<module>.base_layer.bias``; a copy's as ``<module>.modules_to_save[.<adapter>].<key>`` and
  ``<module>.original_module.<key>``); ``"lora_only"``: the wrapped layers' ``<module>.base_layer.bias`` (none on a
  bias-free model: the same file as ``"none"``).

Conv1D layers (GPT-2, peft's ``fan_in_fan_out``) have the same adapter keys and shapes as nn.Linear ones; a
bitsandbytes ``Linear4bit`` base (QLoRA) takes LoRA or DoRA.

Config fields: ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``, ``use_dora``, ``target_modules`` (list,
regex or ``"all-linear"``), ``exclude_modules``, ``rank_pattern``, ``alpha_pattern`` (LoRA); ``init_r``,
``lora_alpha``, ``lora_dropout``, target/exclude and the boolean ``rank_pattern`` (AdaLoRA, whose ``r``,
``use_rslora`` and ``alpha_pattern`` peft ignores, and whose schedule fields only matter for training); for both
``bias``, ``modules_to_save``, ``layers_to_transform``, ``layers_pattern`` and ``task_type``, as peft reads them.
Metadata is ignored. Every other field must be at its default: one that changes the numbers (``lora_bias``, a
base-rewriting ``init_lora_weights`` such as PiSSA or OLoRA, LoRA on an ``nn.Embedding``...) or that this module
does not know raises ``ValueError`` naming it in words, as do missing, unexpected or misshapen tensors, and a target
set that differs from the modules the file has weights for. Nothing is changed in the model before all checks pass.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..modules.adalora import RANKNUM_EPS, AdaLoRALinear
from ..modules.dora import DoRALinear
from ..modules.lora import linear_layout
from ..modules.multi_lora import MultiLoRALinear, multi_lora_layers
from .inject import (
    BIAS_MODES,
    ModulesToSave,
    _why_not_wrappable,
    adapter_layers,
    find_target_modules,
    inject_adapters,
    modules_to_save_names,
    multi_lora_from,
    pattern_value,
    select_modules,
)

__all__ = ["load_peft_adapter", "load_peft_adapters_for_serving", "save_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."  # PeftModel.base_model (the LoraModel) .model (the wrapped base model)

# Config fields each loader reads (or, for AdaLoRA, that peft itself ignores or uses only in training).
# Fields of both: what else peft trains or selects (biases, full module copies, layer indices).
_SELECTION_FIELDS = frozenset({"bias", "modules_to_save", "layers_to_transform", "layers_pattern"})
_LORA_FIELDS = _SELECTION_FIELDS | frozenset(
    {"r", "lora_alpha", "use_rslora", "lora_dropout", "use_dora", "target_modules", "exclude_modules",
     "rank_pattern", "alpha_pattern"}
)  # fmt: skip
_ADALORA_FIELDS = _SELECTION_FIELDS | frozenset(
    {"init_r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
     "r", "use_rslora", "alpha_pattern",  # peft's AdaLoraModel builds every layer from init_r and lora_alpha alone
     "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}  # the schedule
)  # fmt: skip
# Metadata, and settings that cannot change a loaded adapter's numbers on the nn.Linear layers wrapped here.
_IGNORED_FIELDS = frozenset(
    {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
     "inference_mode",
     "runtime_config",  # where adapters live (ephemeral GPU offload), not what they compute
     "megatron_core",  # read only with megatron_config, which must be unset
     "qalora_group_size",  # read only with use_qalora, which must be False
     "fan_in_fan_out",  # peft sets it per layer (with a warning): False on nn.Linear, True on Conv1D, as here
     "loftq_config", "eva_config", "corda_config", "lora_ga_config"}  # settings of init_lora_weights methods
)  # fmt: skip
# init_lora_weights values that only choose the initial A and B, which the file's weights replace. The others
# (pissa*, olora, corda, loftq, lora_ga, mica...) also rewrite the base weights when peft builds the adapter.
_WEIGHT_ONLY_INITS = (True, False, "gaussian", "orthogonal", "eva")
_NEUTRAL_VALUES = {"init_lora_weights": _WEIGHT_ONLY_INITS}
_WHY_UNSUPPORTED = {
    "lora_bias": "lora_bias, a trainable bias on lora_B, is not supported",
    "layer_replication": "duplicates base layers",
    "use_qalora": "QA-LoRA pools the adapter input",
    "target_parameters": "targets nn.Parameters, not modules",
    "trainable_token_indices": "trains embedding rows",
    "ensure_weight_tying": "ties adapters across tied modules",
    "alora_invocation_tokens": "activated LoRA applies only after an invocation sequence",
    "megatron_config": "Megatron tensor-parallel layers",
    "use_dora": "AdaLoRA has no DoRA form",
    "init_lora_weights": "this initialisation rewrites the base weights when peft loads the adapter; convert it "
    "first with save_pretrained(path_initial_model_for_weight_conversion=...)",
}
# init_lora_weights values (by prefix) that rewrite the base weights, named in words in the refusal.
_BASE_REWRITING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ",
                         "lora_ga": "LoRA-GA", "mica": "MiCA"}  # fmt: skip

# File key suffix -> our parameter, per kind.
_LORA_PARAMS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
_DORA_PARAMS = {**_LORA_PARAMS, "lora_magnitude_vector": "magnitude"}
_ADALORA_PARAMS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E", "ranknum": "ranknum"}
_PARAMS = {"lora": _LORA_PARAMS, "dora": _DORA_PARAMS, "adalora": _ADALORA_PARAMS}
_SUFFIX_OF = {kind: {param: suffix for suffix, param in params.items()} for kind, params in _PARAMS.items()}
_REQUIRED = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "magnitude"),
             "adalora": ("lora_A", "lora_B", "lora_E")}  # fmt: skip


# ---- reading ----------------------------------------------------------------------------------------------------


def _adapter_dir(path, adapter_name: str | None) -> Path:
    """The directory holding the adapter. peft's ``save_pretrained`` writes adapters other than ``"default"`` into a
    subfolder named after them, so ``adapter_name`` selects ``path/<adapter_name>`` (or ``path`` for "default")."""
    root = Path(os.fspath(path))
    directory = root
    if adapter_name is not None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty str or None, got {adapter_name!r}")
        directory = root / adapter_name
        if adapter_name == "default" and not (directory / CONFIG_NAME).is_file():
            directory = root
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (a peft adapter directory holds {CONFIG_NAME} and "
                                f"{SAFETENSORS_NAME})")  # fmt: skip
    return directory


def _read_config(directory: Path) -> dict:
    with open(directory / CONFIG_NAME, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{directory / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
    return config


def _config_kind(config: dict, where: Path) -> str:
    """``"lora"``, ``"dora"`` or ``"adalora"``; ValueError naming every field that would change peft's numbers."""
    peft_type = config.get("peft_type")
    if peft_type == "LORA":
        kind, used = ("dora" if config.get("use_dora") else "lora"), _LORA_FIELDS
    elif peft_type == "ADALORA":
        kind, used = "adalora", _ADALORA_FIELDS
    else:
        raise ValueError(f"{where / CONFIG_NAME}: peft_type {peft_type!r} is not supported (supported: 'LORA', with "
                         "use_dora for DoRA, and 'ADALORA')")  # fmt: skip
    unsupported = []
    for field, value in config.items():
        if field in used or field in _IGNORED_FIELDS:
            continue
        if field in _NEUTRAL_VALUES:
            if any(value == v and type(value) is type(v) for v in _NEUTRAL_VALUES[field]):
                continue
        elif value is None or value is False or (isinstance(value, (str, list, dict)) and not value):
            continue
        why = _WHY_UNSUPPORTED.get(field, "a field this loader does not know")
        if field == "init_lora_weights" and isinstance(value, str):
            method = next((n for k, n in _BASE_REWRITING_INITS.items() if value.lower().startswith(k)), None)
            if method is not None:
                why = f"the {method} initialisation is not supported: {why}"
        unsupported.append(f"{field}={value!r} ({why})")
    if unsupported:
        raise ValueError(f"{where / CONFIG_NAME}: unsupported settings, the adapter would not compute peft's numbers "
                         f"here: {'; '.join(unsupported)}")  # fmt: skip
    if config.get("bias", "none") not in BIAS_MODES:
        raise ValueError(f"{where / CONFIG_NAME}: bias={config['bias']!r} is not one of peft's {BIAS_MODES}")
    if config.get("target_modules") is None:
        raise ValueError(f"{where / CONFIG_NAME}: target_modules is not set (peft then uses its per-architecture "
                         "default list); set it to the modules the adapter was trained on")  # fmt: skip
    return kind


def _read_tensors(directory: Path) -> dict[str, Tensor]:
    if (directory / SAFETENSORS_NAME).is_file():
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"reading {SAFETENSORS_NAME} needs the safetensors package: pip install safetensors"
                              ) from exc  # fmt: skip
        tensors = load_file(str(directory / SAFETENSORS_NAME), device="cpu")
    elif (directory / BIN_NAME).is_file():
        tensors = torch.load(directory / BIN_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: neither {SAFETENSORS_NAME} nor {BIN_NAME}")
    if not isinstance(tensors, Mapping) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise ValueError(f"{directory}: the adapter weights are not a mapping of names to tensors")
    return dict(tensors)


def _group_tensors(
    tensors: dict[str, Tensor], kind: str, where: Path
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """``{module: {param: tensor}}`` from the adapter keys, and ``{name: tensor}`` of the other tensors (biases,
    ``modules_to_save`` copies: names relative to the base model, checked by ``_plan_extras``); ValueError naming
    unexpected and missing keys."""
    params = _PARAMS[kind]
    grouped: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        rest = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else None
        suffix = next((s for s in params if rest is not None and rest.endswith(f".{s}")), None)
        if rest is not None and ".lora_embedding_" in rest:
            raise ValueError(f"{where}: tensor {key!r}: LoRA on an nn.Embedding is not supported (only nn.Linear "
                             "and transformers Conv1D layers)")  # fmt: skip
        if suffix is None:
            if rest is not None and "lora_" not in rest:
                extras[rest] = tensor
            else:
                unexpected.append(key)
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: tensor {key!r} is {tensor.dtype}; adapter weights are floating point")
        grouped.setdefault(rest[: -len(suffix) - 1], {})[params[suffix]] = tensor
    if unexpected:
        raise ValueError(f"{where}: unexpected tensors for a {kind} adapter: {_show(unexpected)} (expected "
                         f"'{KEY_PREFIX}<module>.' + one of {list(params)})")  # fmt: skip
    missing = [f"{KEY_PREFIX}{module}.{_SUFFIX_OF[kind][p]}" for module, found in grouped.items()
               for p in _REQUIRED[kind] if p not in found]  # fmt: skip
    if missing:
        raise ValueError(f"{where}: missing tensors: {_show(missing)}")
    if not grouped:
        raise ValueError(f"{where}: the adapter file holds no tensors")
    return grouped, extras


def _show(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(repr(i) for i in items[:limit]) + more


def _check_targets_match(selected: list[str], in_file: Mapping, where: Path) -> None:
    """The config's targets must be exactly the modules the file has weights for (else peft's numbers differ)."""
    targeted = set(selected)
    extra = [m for m in in_file if m not in targeted]
    absent = [m for m in selected if m not in in_file]
    if extra or absent:
        parts = []
        if extra:
            parts.append(f"weights for modules the config does not target (or the model lacks): {_show(extra)}")
        if absent:
            parts.append(f"targeted modules without weights in the file: {_show(absent)}")
        raise ValueError(f"{where}: target_modules/exclude_modules and the adapter file disagree: {'; '.join(parts)}")


def _adalora_masks(config: dict, modules: list[str], init_r: int, where: Path) -> dict[str, list[bool]]:
    """peft's AdaLoRA ``rank_pattern`` (``{"<module>.lora_E": [bool] * init_r}``) as ``{module: keep}``."""
    masks: dict[str, list[bool]] = {}
    for key, keep in (config.get("rank_pattern") or {}).items():
        module, sep, tail = key.rpartition(".lora_E")
        if not sep or (tail and not tail.startswith(".")):  # ".lora_E" or, in memory, ".lora_E.<adapter>"
            raise ValueError(f"{where / CONFIG_NAME}: AdaLoRA rank_pattern key {key!r} is not '<module>.lora_E'")
        if not isinstance(keep, list) or len(keep) != init_r or not all(v in (0, 1) for v in keep):
            raise ValueError(f"{where / CONFIG_NAME}: AdaLoRA rank_pattern[{key!r}] must be {init_r} (init_r) "
                             f"booleans, got {keep!r}")  # fmt: skip
        masks[module] = [bool(v) for v in keep]
    unknown = [m for m in masks if m not in set(modules)]
    if unknown:
        raise ValueError(f"{where / CONFIG_NAME}: AdaLoRA rank_pattern names modules the adapter does not target: "
                         f"{_show(unknown)}")  # fmt: skip
    return masks


def _positive_int(config: dict, field: str, default: int, where: Path) -> int:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where / CONFIG_NAME}: {field} must be a positive int, got {value!r}")
    return value


def _number(value, what: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where / CONFIG_NAME}: {what} must be a finite number, got {value!r}")
    return float(value)


class _Adapter:
    """One peft adapter read from disk and checked: per module, its tensors and the layer settings they need."""

    def __init__(self, directory: Path) -> None:
        self.where = directory
        self.config = _read_config(directory)
        self.kind = _config_kind(self.config, directory)
        self.modules, self.extras = _group_tensors(_read_tensors(directory), self.kind, directory)
        c = self.config
        self.target_modules, self.exclude_modules = c["target_modules"], c.get("exclude_modules")
        self.bias = c.get("bias", "none")
        self.modules_to_save = c.get("modules_to_save") or None
        self.selection = dict(layers_to_transform=c.get("layers_to_transform"), layers_pattern=c.get("layers_pattern"),
                              modules_to_save=self.modules_to_save, task_type=c.get("task_type"))  # fmt: skip
        self.dropout = _number(c.get("lora_dropout", 0.0), "lora_dropout", directory)
        self.alpha = _number(c.get("lora_alpha", 8), "lora_alpha", directory)
        if self.kind == "adalora":
            self.r = _positive_int(c, "init_r", 12, directory)
            self.rslora, self.rank_pattern, self.alpha_pattern = False, {}, {}
            self.masks = _adalora_masks(c, list(self.modules), self.r, directory)
        else:
            self.r = _positive_int(c, "r", 8, directory)
            self.rslora = bool(c.get("use_rslora", False))
            self.rank_pattern, self.alpha_pattern = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
            self.masks = {}

    def rank(self, module: str) -> int:
        """Rows of the module's lora_A in the file: r (rank_pattern), or AdaLoRA's kept count."""
        if self.kind == "adalora":
            return sum(self.masks[module]) if module in self.masks else self.r
        return pattern_value(self.rank_pattern, module, self.r)

    def layer_alpha(self, module: str) -> float:
        return _number(pattern_value(self.alpha_pattern, module, self.alpha), f"alpha_pattern for {module}", self.where)

    def check_shapes(self, module: str, in_features: int, out_features: int) -> None:
        k = self.rank(module)
        expected = {"lora_A": (k, in_features), "lora_B": (out_features, k), "magnitude": (out_features,),
                    "lora_E": (k, 1), "ranknum": (1,)}  # fmt: skip
        for param, tensor in self.modules[module].items():
            if tuple(tensor.shape) != expected[param]:
                source = "AdaLoRA's kept triplets" if self.kind == "adalora" else "r / rank_pattern"
                key = f"{KEY_PREFIX}{module}.{_SUFFIX_OF[self.kind][param]}"
                raise ValueError(f"{self.where}: tensor '{key}' has shape "
                                 f"{list(tensor.shape)}; the layer [{out_features}, {in_features}] with rank {k} "
                                 f"({source}) needs {list(expected[param])}")  # fmt: skip

    def pool_weights(self, module: str) -> tuple[Tensor, Tensor, float, bool, Tensor | None] | None:
        """The module's adapter in ``AdapterPool.add``'s form (lora_A, lora_B, alpha, rslora, magnitude); None for
        an AdaLoRA layer with no kept triplet. AdaLoRA folds lambda into A and its scale into alpha (exact)."""
        w = self.modules[module]
        if self.kind != "adalora":
            return w["lora_A"], w["lora_B"], self.layer_alpha(module), self.rslora, w.get("magnitude")
        k = self.rank(module)
        if k == 0:
            return None
        ranknum = float(w["ranknum"].reshape(-1)[0]) if "ranknum" in w else float(self.r)
        scaling = self.alpha if self.alpha > 0 else float(self.r)  # peft: lora_alpha if lora_alpha > 0 else r
        # The pool's scale is alpha / rank: alpha = k * peft's scaling / (ranknum + eps) gives peft's scale.
        return w["lora_A"] * w["lora_E"], w["lora_B"], k * scaling / (ranknum + RANKNUM_EPS), False, None


# ---- load into inject_adapters layers ---------------------------------------------------------------------------


def _promote(param: Tensor, tensor: Tensor) -> None:
    """Make ``param`` at least as precise as ``tensor`` (peft keeps float32 adapters on a bf16 base)."""
    dtype = torch.promote_types(param.dtype, tensor.dtype)
    if dtype != param.dtype:
        param.data = param.data.to(dtype)


def _adopt(param: Tensor, tensor: Tensor) -> None:
    _promote(param, tensor)
    param.copy_(tensor)


@torch.no_grad()
def _load_layer(layer: nn.Module, adapter: _Adapter, module: str) -> None:
    w = adapter.modules[module]
    if isinstance(layer, AdaLoRALinear):
        for name in ("lora_A", "lora_B", "lora_E"):
            _promote(getattr(layer, name), w[name])
        if "ranknum" in w:  # an older peft saved it; load_state_dict's hook refreshes the layer's host copy
            layer.load_state_dict({"ranknum": w["ranknum"].to(layer.ranknum.dtype)}, strict=False)
        keep = adapter.masks.get(module)
        if keep is None:
            layer.lora_A.copy_(w["lora_A"])
            layer.lora_B.copy_(w["lora_B"])
            layer.lora_E.copy_(w["lora_E"])
            return
        idx = torch.tensor(keep).nonzero().view(-1).to(layer.lora_A.device)
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.zero_()
        layer.lora_A.index_copy_(0, idx, w["lora_A"].to(layer.lora_A))
        layer.lora_B.index_copy_(1, idx, w["lora_B"].to(layer.lora_B))
        layer.lora_E.index_copy_(0, idx, w["lora_E"].to(layer.lora_E))
        layer.set_triplet_mask(torch.tensor(keep))
        return
    _adopt(layer.lora_A.weight, w["lora_A"])
    _adopt(layer.lora_B.weight, w["lora_B"])
    if isinstance(layer, DoRALinear):
        _adopt(layer.lora_magnitude_vector, w["magnitude"])
        layer.clear_norm_cache()


_BASE_LAYER = ".base_layer."  # peft's adapter layers hold the base layer's parameters below base_layer


def _plan_extras(adapter: _Adapter, model: nn.Module, targets: list[str], saved: list[str]) -> list[tuple]:
    """Where each non-adapter tensor of the file goes, checked before the model changes (peft's load rules):

    * ``<m>.<rest>`` with ``<m>`` a ``modules_to_save`` module: its trainable copy (``("copy", m, rest, t)``); peft's
      raw ``<m>.modules_to_save.<adapter>.<rest>`` too, and ``<m>.original_module.<rest>`` the original module;
    * with ``bias`` "all" / "lora_only", a ``*.bias``: that base parameter, ``<m>.base_layer.<p>`` of a
      targeted module being its ``<m>.<p>`` (``("base", parameter, t)``, the Parameter the adapter layer shares).

    Anything else, or a name the model lacks or a shape it does not have, raises ValueError.
    """
    base = model.state_dict(keep_vars=True)
    targeted = set(targets)
    plan, unexpected = [], []
    for key, tensor in adapter.extras.items():
        owner = next((m for m in saved if key.startswith(f"{m}.")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if rest.startswith("original_module."):
                name, where = f"{owner}.{rest.removeprefix('original_module.')}", "base"
            else:  # peft's raw name keeps modules_to_save.<adapter>, without the adapter when it was 2nd to last
                rest = rest.removeprefix("modules_to_save.")
                if f"{owner}.{rest}" not in base and "." in rest:
                    rest = rest.split(".", 1)[1]
                name, where = f"{owner}.{rest}", "copy"
        elif adapter.bias != "none" and key.endswith(".bias"):
            module, sep, param = key.partition(_BASE_LAYER)
            name = f"{module}.{param}" if sep and module in targeted else key
            owner, rest, where = None, None, "base"
        else:
            unexpected.append(key)
            continue
        if name not in base:
            unexpected.append(key)
            continue
        if tuple(base[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{adapter.where}: tensor '{KEY_PREFIX}{key}' has shape {list(tensor.shape)}; the "
                             f"model's {name!r} is {list(base[name].shape)}")  # fmt: skip
        plan.append(("copy", owner, rest, tensor) if where == "copy" else ("base", base[name], tensor))
    if unexpected:
        hint = ""
        if adapter.bias == "none" and any(k.endswith(".bias") for k in unexpected):
            hint = " (bias tensors in a file whose config says bias='none')"
        keys = [KEY_PREFIX + k for k in unexpected]
        raise ValueError(f"{adapter.where}: unexpected tensors for a {adapter.kind} adapter: {_show(keys)} "
                         f"(expected '{KEY_PREFIX}<module>.' + one of {list(_PARAMS[adapter.kind])}, the "
                         f"modules_to_save {adapter.modules_to_save or []} or, with bias, the model's "
                         f"biases){hint}")  # fmt: skip
    return plan


@torch.no_grad()
def _load_extras(model: nn.Module, plan: list[tuple]) -> None:
    for entry in plan:
        if entry[0] == "copy":
            _, owner, rest, tensor = entry
            target = model.get_submodule(owner).trainable_copy.state_dict(keep_vars=True)[rest]
        else:
            _, target, tensor = entry
        target.copy_(tensor.to(target.dtype))


def load_peft_adapter(model: nn.Module, path, *, adapter_name: str | None = None) -> list[str]:
    """Wrap ``model`` as peft's adapter directory ``path`` says and load its weights; returns the wrapped modules.

    ``model``: the plain base model the adapter was trained on (e.g. a transformers ``LlamaForCausalLM``; peft's
    module names are relative to it). ``path``: a directory with ``adapter_config.json`` and
    ``adapter_model.safetensors`` (or ``adapter_model.bin``); ``adapter_name``: a subfolder of it, as peft's
    ``save_pretrained`` writes adapters not named "default". LoRA / rsLoRA -> ``LoRALinear``, ``use_dora`` ->
    ``DoRALinear``, AdaLoRA -> ``AdaLoRALinear`` (masked triplets masked); everything else is frozen. Raises
    ``ValueError`` naming unsupported config fields, missing / unexpected / misshapen tensors, or targets that differ
    from the file's modules, before the model is changed. ``bias`` ("all", "lora_only": the file's biases are loaded
    into the model's, which train), ``modules_to_save`` (trainable ``ModulesToSave`` copies loaded from the file),
    ``layers_to_transform`` / ``layers_pattern`` and ``task_type`` mean what they mean in peft. Conv1D layers
    (GPT-2) are wrapped as peft's ``fan_in_fan_out`` layers.
    """
    adapter = _Adapter(_adapter_dir(path, adapter_name))
    names = find_target_modules(model, adapter.target_modules, adapter.exclude_modules, **adapter.selection)
    _check_targets_match(names, adapter.modules, adapter.where)
    for name in names:
        in_features, out_features, _ = linear_layout(model.get_submodule(name))
        adapter.check_shapes(name, in_features, out_features)
    extras = _plan_extras(adapter, model, names, modules_to_save_names(model, adapter.modules_to_save))
    inject_adapters(
        model,
        adapter.target_modules,
        method=adapter.kind,
        r=adapter.r,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        rslora=adapter.rslora,
        rank_pattern=adapter.rank_pattern,
        alpha_pattern=adapter.alpha_pattern,
        exclude_modules=adapter.exclude_modules,
        bias=adapter.bias,
        **adapter.selection,
    )
    for name in names:
        _load_layer(model.get_submodule(name), adapter, name)
    _load_extras(model, extras)
    return names


# ---- save ------------------------------------------------------------------------------------------------------


def _json_number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _uniform(values: dict[str, object], what: str) -> object:
    distinct = sorted({str(v) for v in values.values()})
    if len(distinct) > 1:
        raise ValueError(f"the layers have different {what} ({', '.join(distinct)}); peft's config holds one")
    return next(iter(values.values()))


def _exact_patterns(values: dict[str, object], default: object) -> dict[str, object]:
    """A peft ``rank_pattern`` / ``alpha_pattern`` that gives each module exactly its value (first key wins)."""
    differing = {n: v for n, v in values.items() if v != default}
    if not differing:
        return {}
    by_length = sorted(values, key=len, reverse=True)  # a key can also match longer names that end with it
    candidates = (
        {n: values[n] for n in by_length if n in differing},  # readable: the full names of the differing modules
        {re.escape(n): values[n] for n in by_length},  # always exact: every module, longest first
    )
    for pattern in candidates:
        if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
            return pattern
    raise AssertionError("unreachable: escaped full names, longest first, select each module exactly")


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """peft's ``target_modules`` selecting exactly ``names``: their leaf names when those select nothing else,
    else a regex of the escaped full names (peft fullmatches a string)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if {n for n, _ in select_modules(model, leaves)} == set(names):
        return leaves
    return "|".join(re.escape(n) for n in names)


def _training_schedule(adalora_config) -> dict:
    """AdaLoRA's schedule fields for the config file (peft's AdaLoraConfig refuses total_step None)."""
    if adalora_config is not None and hasattr(adalora_config, "config") and not hasattr(adalora_config, "tinit"):
        adalora_config = adalora_config.config  # a RankAllocator
    fields = {"target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
              "orth_reg_weight": 0.5, "total_step": 1}  # fmt: skip
    if adalora_config is not None:
        fields = {k: getattr(adalora_config, k, v) for k, v in fields.items()}
    if not isinstance(fields["total_step"], int) or fields["total_step"] < 1:
        fields["total_step"] = max(1, fields["tinit"] + fields["tfinal"] + 1)
    return fields


@contextlib.contextmanager
def _one_adapter_of_pools(model: nn.Module, adapter_name: str):
    """Within the block, every ``MultiLoRALinear`` of ``model`` is a ``LoRALinear`` / ``DoRALinear`` holding pool
    adapter ``adapter_name`` (a copy in peft's layout, on the shared frozen base), or its bare base layer where that
    adapter has no weights; the pools are put back on exit. What ``save_peft_adapter(adapter_name=...)`` saves."""
    from ..modules.lora import LoRALinear

    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError(f"adapter_name={adapter_name!r} selects one adapter of MultiLoRALinear pools, but model "
                         f"({type(model).__name__}) has none")  # fmt: skip
    if not any(adapter_name in m.pool for _, m in layers):
        raise KeyError(f"no MultiLoRALinear pool of the model holds an adapter named {adapter_name!r}")
    swapped = []
    try:
        for n, m in layers:
            base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            base.weight, base.bias = m.weight, m.bias
            single = base
            if adapter_name in m.pool:
                w = m.pool.weights(adapter_name)
                cls = LoRALinear if w.magnitude is None else DoRALinear
                single = cls.from_linear(base, w.lora_A.shape[0], alpha=w.alpha, dropout=m.dropout, rslora=w.rslora)
                with torch.no_grad():
                    single.lora_A.weight.copy_(w.lora_A)
                    single.lora_B.weight.copy_(w.lora_B)
                    if w.magnitude is not None:
                        single.lora_magnitude_vector.copy_(w.magnitude)
            model.set_submodule(n, single)
            swapped.append((n, m))
        yield
    finally:
        for n, m in swapped:
            model.set_submodule(n, m)


def save_peft_adapter(
    model: nn.Module,
    path,
    *,
    base_model_name_or_path: str | None = None,
    adalora_config=None,
    bias: str = "none",
    task_type: str | None = None,
    adapter_name: str | None = None,
) -> list[str]:
    """Write the adapters of a model wrapped by ``inject_adapters`` as a peft adapter directory; returns the modules.

    ``path`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` such that
    ``peft.PeftModel.from_pretrained(base_model, path)`` computes what ``model`` computes. LoRA / DyLoRA layers are
    saved at their active rank (the allocated r unless ``set_rank`` truncated it: then ``A[:b]``, ``B[:, :b]`` with
    r = b, whose scale ``alpha / b`` is DyLoRA's); per-layer r and alpha become exact ``rank_pattern`` /
    ``alpha_pattern`` entries. DoRA adds ``lora_magnitude_vector``. AdaLoRA writes only the kept triplets and the
    boolean ``rank_pattern`` of the layers' masks, as peft does; ``adalora_config`` (our ``AdaLoRAConfig``, a
    ``RankAllocator`` or peft's ``AdaLoraConfig``) supplies the schedule fields (default: peft's, ``total_step=1``).
    One kind per model (rsLoRA, dropout and, for AdaLoRA, r and alpha uniform): peft's config holds one of each.
    ``bias`` (what ``inject_adapters`` was given: "all" writes every ``*.bias`` tensor, "lora_only" the wrapped
    layers' biases, as peft names them) and ``task_type`` go into the config; every ``ModulesToSave`` copy is
    written under its module's name and listed in ``modules_to_save``, as peft writes them.
    ``adapter_name``: write that one adapter of the model's ``MultiLoRALinear`` pools (e.g. one job of a mixed-batch
    training run) instead; layers whose pool lacks it are left out of the file.
    """
    if adapter_name is not None:  # one adapter of a model's MultiLoRALinear pools (trained in mixed batches)
        with _one_adapter_of_pools(model, adapter_name):
            return save_peft_adapter(model, path, base_model_name_or_path=base_model_name_or_path,
                                     adalora_config=adalora_config, bias=bias, task_type=task_type)  # fmt: skip
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no adapter layers: wrap it with inject_adapters first")
    multi = [n for n, m in layers if isinstance(m, MultiLoRALinear)]
    if multi:
        raise ValueError(f"MultiLoRALinear layers ({_show(multi, 3)}) hold a pool of adapters, not one: save works on "
                         "the layers inject_adapters builds")  # fmt: skip
    if any(not n for n, _ in layers):
        raise ValueError("model is itself an adapter layer; save the model that contains it")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"merged layers ({_show(merged, 3)}) hold the adapter inside the weight: unmerge() first")
    kinds = {n: "adalora" if isinstance(m, AdaLoRALinear) else "dora" if isinstance(m, DoRALinear) else "lora"
             for n, m in layers}  # fmt: skip
    kind = _uniform(kinds, "adapter types (LoRA, DoRA, AdaLoRA)")
    names = [n for n, _ in layers]
    tensors: dict[str, Tensor] = {}

    def put(key: str, t: Tensor) -> None:
        tensors[KEY_PREFIX + key] = t.detach().to("cpu", copy=True).contiguous()

    config: dict = {"peft_type": "ADALORA" if kind == "adalora" else "LORA"}
    dropout = _uniform({n: m.lora_dropout for n, m in layers}, "lora_dropout")
    if kind == "adalora":
        r = _uniform({n: m.r for n, m in layers}, "r (peft's AdaLoRA builds every layer with init_r)")
        alpha = _uniform({n: m.lora_alpha for n, m in layers}, "alpha")
        odd = [n for n, m in layers if float(m.ranknum.reshape(-1)[0]) != m.r]
        if odd:
            raise ValueError(f"AdaLoRA layers whose ranknum is not r ({_show(odd, 3)}): peft sets ranknum = init_r")
        masks = {n: m.triplet_mask for n, m in layers}
        rank_pattern = None
        if any(k is not None for k in masks.values()):
            rank_pattern = {}
            for n, m in layers:
                keep = masks[n] if masks[n] is not None else torch.ones(m.r, dtype=torch.bool)
                rank_pattern[f"{n}.lora_E"] = keep.tolist()
                masks[n] = keep
        for n, m in layers:
            keep = masks[n]
            idx = None if keep is None else keep.nonzero().view(-1).to(m.lora_A.device)
            A, B, E = m.lora_A, m.lora_B, m.lora_E
            if idx is not None:  # peft's files hold the kept triplets only (resize_state_dict_by_rank_pattern)
                A, B, E = A.index_select(0, idx), B.index_select(1, idx), E.index_select(0, idx)
            put(f"{n}.lora_A", A)
            put(f"{n}.lora_B", B)
            put(f"{n}.lora_E", E)
        config.update(init_r=r, lora_alpha=_json_number(alpha), rank_pattern=rank_pattern, alpha_pattern={},
                      use_rslora=False, use_dora=False, **_training_schedule(adalora_config))  # fmt: skip
    else:
        rslora = _uniform({n: m.use_rslora for n, m in layers}, "use_rslora")
        ranks = {n: m.active_rank for n, m in layers}
        alphas = {n: _json_number(m.lora_alpha) for n, m in layers}
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
        for n, m in layers:
            b = m.active_rank
            put(f"{n}.lora_A.weight", m.lora_A.weight[:b])
            put(f"{n}.lora_B.weight", m.lora_B.weight[:, :b])
            if kind == "dora":
                put(f"{n}.lora_magnitude_vector", m.lora_magnitude_vector)
        config.update(r=r, lora_alpha=alpha, rank_pattern=_exact_patterns(ranks, r),
                      alpha_pattern=_exact_patterns(alphas, alpha), use_rslora=rslora,
                      use_dora=kind == "dora")  # fmt: skip
    saved = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    for n, m in saved:  # peft's file: the copy's state dict under the module's own name
        for key, t in m.trainable_copy.state_dict().items():
            put(f"{n}.{key}", t)
    tensors.update({KEY_PREFIX + k: t for k, t in _peft_biases(model, bias).items()})
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None  # what peft records
    config.update(
        target_modules=_target_modules(model, names),
        exclude_modules=None,
        lora_dropout=dropout,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
        bias=bias,
        lora_bias=False,
        fan_in_fan_out=all(m.fan_in_fan_out for _, m in layers),  # peft sets it per layer anyway
        init_lora_weights=True,
        modules_to_save=[n for n, _ in saved] or None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ImportError(f"writing {SAFETENSORS_NAME} needs the safetensors package: pip install safetensors") from exc
    directory = Path(os.fspath(path))
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(directory / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(dict(sorted(config.items())), f, indent=2)  # patterns keep their order: peft's first match wins
        f.write("\n")
    return names


def _peft_biases(model: nn.Module, bias: str) -> dict[str, Tensor]:
    """The bias tensors peft's ``get_peft_model_state_dict`` writes, under peft's live names (an adapter layer's own
    parameters sit below ``base_layer`` there): "all": every state-dict entry named ``*.bias``
    (``ModulesToSave`` entries included, under both their names, as peft does), "lora_only": the wrapped layers'."""
    if bias == "none":
        return {}
    layers = dict(adapter_layers(model))
    out = {}
    for key, t in model.state_dict().items():
        module, _, param = key.rpartition(".")
        peft_key = f"{module}.base_layer.{param}" if module in layers and param in ("weight", "bias") else key
        if "lora_" in peft_key:
            continue
        if bias == "all" and peft_key.endswith(".bias") or bias == "lora_only" and module in layers and param == "bias":
            out[_without_adapter_name(peft_key)] = t.detach().to("cpu", copy=True).contiguous()
    return out


def _without_adapter_name(key: str, adapter_name: str = "default") -> str:
    """peft's ``_remove_adapter_name_from_state_dict_key``: the adapter name goes when it is the last or the second
    to last part (``head.modules_to_save.default.bias`` -> ``head.modules_to_save.bias``)."""
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    head, _, last = key.rpartition(".")
    return f"{head.removesuffix(f'.{adapter_name}')}.{last}" if head else key


# ---- many adapters into MultiLoRALinear pools -------------------------------------------------------------------


def load_peft_adapters_for_serving(
    model: nn.Module, adapters: Mapping[str, object], *, capacity: int | None = None, max_rank: int | None = None
) -> list[str]:
    """Load several peft adapters into ``MultiLoRALinear`` pools, each under its name, for ``serve_batch``.

    adapters: ``{name: adapter directory}`` (LoRA, rsLoRA, DoRA, AdaLoRA folded into LoRA form). The union of their
    target modules is wrapped with ``MultiLoRALinear`` (``capacity`` slots, default the number of adapters;
    ``max_rank``, default the largest rank); layers that already are ``MultiLoRALinear`` are reused. In every
    ``MultiLoRALinear`` of the model, an adapter that does not target the layer is registered as untargeted, so a
    batch naming it gets the base output there, as peft does. Returns the names of the layers that hold an adapter.
    Everything is read and checked before the model changes; a failure while loading undoes the loads.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters must be a non-empty mapping {name: peft adapter directory}")
    read: dict[str, _Adapter] = {}
    for name, path in adapters.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter names must be non-empty strings, got {name!r}")
        adapter = _Adapter(_adapter_dir(path, None))
        selected = []
        for n, m in select_modules(model, adapter.target_modules, adapter.exclude_modules, **adapter.selection):
            why = None if isinstance(m, MultiLoRALinear) else _why_not_wrappable(m)
            if why is not None:
                raise TypeError(f"{adapter.where}: target module {n!r} is a {type(m).__name__}; only nn.Linear, "
                                f"Conv1D (or MultiLoRALinear) can serve adapters: {why}")  # fmt: skip
            selected.append(n)
        saved = modules_to_save_names(model, adapter.modules_to_save)
        if adapter.extras or saved:
            _plan_extras(adapter, model, selected, saved)  # a file that is wrong anyway says so first
            what = f"modules_to_save copies ({_show(saved, 3)})" if saved else "biases"
            raise ValueError(f"{adapter.where}: this adapter also trains {what}, which change the base model for "
                             "every request; a mixed batch cannot serve it: load it alone with "
                             "load_peft_adapter")  # fmt: skip
        _check_targets_match(selected, adapter.modules, adapter.where)
        read[name] = adapter
    modules = {n: m for n, m in model.named_modules() if any(n in a.modules for a in read.values())}
    ranks = {name: {mod: a.rank(mod) for mod in a.modules} for name, a in read.items()}
    for mod, layer in modules.items():
        for a in read.values():
            if mod in a.modules:
                a.check_shapes(mod, layer.in_features, layer.out_features) if isinstance(layer, MultiLoRALinear) \
                    else a.check_shapes(mod, *linear_layout(layer)[:2])  # fmt: skip
    new_capacity = capacity if capacity is not None else len(read)
    new_max_rank = max_rank if max_rank is not None else max(max(r.values()) for r in ranks.values())
    for mod, layer in modules.items():  # room for every adapter that targets the layer
        pool_capacity, pool_rank = (layer.pool.capacity - len(layer.pool), layer.pool.max_rank) \
            if isinstance(layer, MultiLoRALinear) else (new_capacity, new_max_rank)  # fmt: skip
        targeting = [name for name in read if mod in read[name].modules]
        if len(targeting) > pool_capacity:
            raise ValueError(f"module {mod!r}: {len(targeting)} adapters target it but its pool has {pool_capacity} "
                             "free slots (pass capacity=)")  # fmt: skip
        too_big = [f"{name} (r={ranks[name][mod]})" for name in targeting if ranks[name][mod] > pool_rank]
        if too_big:
            raise ValueError(f"module {mod!r}: adapters above its pool's max_rank {pool_rank}: {', '.join(too_big)}")
    for n, m in multi_lora_layers(model):
        clash = [name for name in read if name in m.pool or name in m.pool.untargeted]
        if clash:
            raise ValueError(f"module {n!r} already has adapters named {clash}")

    replaced = []
    for mod, layer in modules.items():
        if not isinstance(layer, MultiLoRALinear):
            flags = [p.requires_grad for p in (layer.weight, layer.bias) if p is not None]
            model.set_submodule(mod, multi_lora_from(layer, new_capacity, new_max_rank))
            replaced.append((mod, layer, flags))
    added, holding = [], []
    try:
        for n, m in model.named_modules():
            if not isinstance(m, MultiLoRALinear):
                continue
            for name, a in read.items():
                weights = a.pool_weights(n) if n in a.modules else None
                if weights is None:
                    m.pool.add_untargeted(name)
                else:
                    A, B, alpha, rslora, magnitude = weights
                    m.add_adapter(name, A, B, alpha=alpha, magnitude=magnitude, rslora=rslora)
                    if n not in holding:
                        holding.append(n)
                added.append((m, name))
    except BaseException:
        for m, name in reversed(added):
            m.remove_adapter(name)
        for mod, linear, flags in replaced:
            model.set_submodule(mod, linear)
            for p, flag in zip([p for p in (linear.weight, linear.bias) if p is not None], flags, strict=True):
                p.requires_grad_(flag)
        raise
    return holding
