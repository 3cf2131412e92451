"""AdaLoRA training helpers (AdaLoRA paper, Algorithm 1): the rank allocator, the orthogonality penalty.

AdaLoRA trains ``AdaLoRALinear`` layers (``delta W = P diag(lambda) Q``, allocated rank ``init_r`` each) while a
global budget of triplets ``(P[:, i], lambda_i, Q[i])`` shrinks from ``init_r`` per layer to ``target_r`` per layer
on a cubic schedule; at each allocation the least important triplets across all layers are masked. Everything
follows peft's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``, so a run moves over from peft unchanged:

* sensitivity of every entry of P, lambda, Q: ``I = |w * grad w|``, at the weights the call sees (peft's
  documented order calls it after ``optimizer.step()``, so the stepped weights with that step's gradient);
* smoothing ``Ibar = beta1 Ibar + (1 - beta1) I`` and uncertainty ``Ubar = beta2 Ubar + (1 - beta2) |I - Ibar|``
  (paper Eqs. 8-10), entry score ``s = Ibar * Ubar`` (Eq. 11);
* triplet score ``S_i = s(lambda_i) + mean_k s(Q_ik) + mean_n s(P_ni)`` (Eq. 7; peft sums in this order);
* budget (Eq. 12, peft's boundaries and integer rounding), with ``b0 = init_bgt`` (sum of the layers' r) and
  ``bT = target_r * n_layers``: ``b0`` while ``step <= tinit``; then
  ``int((b0 - bT) * (1 - (step - tinit) / (total_step - tfinal - tinit))**3 + bT)``, masking every ``deltaT``
  steps; at ``step == total_step - tfinal`` a last mask to ``bT`` fixes the pattern (and the EMAs are reset);
  after it the masked lambda are zeroed again after every step;
* masking: the ``b0 - budget``-th smallest score is the threshold and every triplet scoring ``<=`` it gets
  lambda_i = 0 (peft's ``kthvalue`` / ``masked_fill_``; ties at the threshold are all masked).

What differs from peft is only what is computed. A masked triplet is skipped by its layer (see
``lowrank_kernels.modules.adalora``): the allocator records the mask on the layer when it masks, with one host sync
per allocation for the whole model (peft: one ``.item()`` and one ``.tolist()`` per layer). While the allocator
still reallocates, masked lambda_i keep peft's gradient (``masked_lambda_grad=True``, the default: the layer's
backward computes it at the masked count), so their sensitivity and the optimizer's update of lambda_i are
peft's. Between two allocations (``deltaT > 1``) peft's forward includes the masked triplets again, their lambda
having been moved off zero by the optimizer; the allocator then clears the layers' masks, so those steps compute
every triplet, as peft does. Once the pattern is final, masked triplets are skipped entirely (their peft gradient
would be undone by the re-zeroing after each step). Remaining differences, both invisible to the loss: with
``masked_lambda_grad=False`` masked triplets get no gradient at all (pruning: cheaper, a pruned triplet scores 0
and stays pruned unless the budget has room, and masks are kept between allocations); and after the final mask a
gradient-norm clip sees no gradient from the masked lambda (peft's does).

Typical loop (peft's order)::

    allocator = RankAllocator(model, target_r=8, tinit=200, tfinal=500, deltaT=10, total_step=3000)
    for step, (x, y) in enumerate(data):
        loss = loss_fn(model(x), y) + allocator.orth_reg_weight * orth_reg(model)
        loss.backward()
        optimizer.step()
        allocator.update_and_allocate(model, step)
        optimizer.zero_grad()

``RankAllocator(model, peft_config)`` also takes peft's ``AdaLoraConfig`` (or any object with its field names).
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import Tensor, nn

from lowrank_kernels.modules.adalora import AdaLoRALinear

__all__ = ["AdaLoRAConfig", "RankAllocator", "orth_reg"]

_ORTH_REG_FORMS = ("paper", "peft")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclasses.dataclass
class AdaLoRAConfig:
    """The allocator's settings, with peft's ``AdaLoraConfig`` names and defaults.

    target_r: average rank per layer at the end; init_r: the rank layers are built with (``AdaLoRALinear`` r; the
    allocator reads the budget from the layers, as peft does); tinit: warm-up steps without masking; tfinal: final
    steps with the pattern fixed; deltaT: steps between allocations; beta1, beta2: EMA factors of sensitivity and
    uncertainty; orth_reg_weight: the penalty's weight in the loss (peft's default 0.5); total_step: required.
    lora_alpha, lora_dropout: what to build the layers with (``AdaLoRALinear.from_linear(linear, init_r, ...)``).
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if not _is_int(value) or value < (1 if name in ("init_r", "deltaT") else 0):
                raise ValueError(f"{name} must be an int >= {1 if name in ('init_r', 'deltaT') else 0}, got {value!r}")
        for name in ("beta1", "beta2"):  # peft asserts 0 < beta < 1
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if not _is_int(self.total_step) or self.total_step <= 0:  # recent peft raises the same
            raise ValueError(
                f"AdaLoRA needs total_step, the number of training steps (an int > 0), got {self.total_step!r}"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"the schedule leaves no budgeting phase: tinit ({self.tinit}) must be < total_step - tfinal "
                f"({self.total_step} - {self.tfinal}); decrease tinit/tfinal or increase total_step"
            )


def _adalora_layers(model: nn.Module) -> list[tuple[str, AdaLoRALinear]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, AdaLoRALinear)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no AdaLoRALinear layer")
    return layers


def _param_names(layer_name: str) -> tuple[str, str, str]:
    prefix = f"{layer_name}." if layer_name else ""
    return f"{prefix}lora_A", f"{prefix}lora_B", f"{prefix}lora_E"


class RankAllocator:
    """peft's AdaLoRA ``RankAllocator`` plus ``AdaLoraModel.update_and_allocate``, over the model's ``AdaLoRALinear``s.

    ``RankAllocator(model, config)`` with an ``AdaLoRAConfig`` (or peft's ``AdaLoraConfig``), or
    ``RankAllocator(model, target_r=..., total_step=..., ...)`` with the same field names. The budget is read from
    the layers at construction: ``init_bgt`` = sum of their r, ``target_bgt`` = ``target_r`` * their number.

    masked_lambda_grad: while allocating, masked singular values keep peft's gradient (default; see the module
    docstring). False: masked triplets are skipped in the backward too (pure pruning, not peft's semantics).

    State, as peft names it: ``ipt``, ``exp_avg_ipt``, ``exp_avg_unc`` (dicts keyed ``"<layer>.lora_A"`` etc.) and
    ``rank_pattern`` (``{layer name: [kept?] * r}``, the last mask).
    """

    def __init__(self, model: nn.Module, config=None, *, masked_lambda_grad: bool = True, **kwargs) -> None:
        if config is None:
            config = AdaLoRAConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword settings, not both")
        elif not isinstance(config, AdaLoRAConfig):  # peft's AdaLoraConfig, or anything with its field names
            names = [f.name for f in dataclasses.fields(AdaLoRAConfig)]
            config = AdaLoRAConfig(**{n: getattr(config, n) for n in names if hasattr(config, n)})
        self.config = config
        self.masked_lambda_grad = bool(masked_lambda_grad)
        self.beta1, self.beta2 = float(config.beta1), float(config.beta2)
        self.orth_reg_weight = float(config.orth_reg_weight)
        layers = _adalora_layers(model)
        self._names = [name for name, _ in layers]
        self.init_bgt = sum(m.r for _, m in layers)
        self.target_bgt = config.target_r * len(layers)
        if self.target_bgt > self.init_bgt:
            raise ValueError(
                f"target_r={config.target_r} exceeds the layers' average rank ({self.init_bgt} triplets in "
                f"{len(layers)} layers): the budget can only shrink"
            )
        self.rank_pattern: dict[str, list[bool]] | None = None
        self._final = False  # the pattern was fixed by the allocation at total_step - tfinal
        self.reset_ipt()

    # ---- peft's RankAllocator API ------------------------------------------------------------------------------

    def set_total_step(self, total_step: int) -> None:
        self.config = dataclasses.replace(self.config, total_step=total_step)  # validated again

    def reset_ipt(self) -> None:
        self.ipt: dict[str, Tensor] = {}
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at ``step``): peft's cubic schedule with its boundaries."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        """Sensitivity ``|p * grad p|`` of every P, lambda, Q entry and its EMAs (batched with ``torch._foreach_*``).

        A parameter without a gradient (a layer that was not run) counts as a zero gradient.
        """
        names, params = [], []
        for layer_name, layer in self._layers(model):
            for name, p in zip(_param_names(layer_name), (layer.lora_A, layer.lora_B, layer.lora_E), strict=True):
                names.append(name)
                params.append(p)
                if name not in self.exp_avg_ipt:
                    self.exp_avg_ipt[name] = torch.zeros_like(p)
                    self.exp_avg_unc[name] = torch.zeros_like(p)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        avg = [self.exp_avg_ipt[n] for n in names]
        unc = [self.exp_avg_unc[n] for n in names]
        torch._foreach_mul_(avg, self.beta1)  # Ibar = beta1 Ibar + (1 - beta1) I
        torch._foreach_add_(avg, torch._foreach_mul(ipt, 1 - self.beta1))
        dev = torch._foreach_sub(ipt, avg)  # Ubar = beta2 Ubar + (1 - beta2) |I - Ibar|
        torch._foreach_abs_(dev)
        torch._foreach_mul_(dev, 1 - self.beta2)
        torch._foreach_mul_(unc, self.beta2)
        torch._foreach_add_(unc, dev)
        self.ipt = dict(zip(names, ipt, strict=True))

    def triplet_scores(self, model: nn.Module) -> dict[str, Tensor]:
        """``S_i = s(lambda_i) + mean_k s(Q_ik) + mean_n s(P_ni)`` per layer ([r] each), ``s = Ibar * Ubar``."""
        scores = {}
        for layer_name, _ in self._layers(model):
            a, b, e = _param_names(layer_name)
            if e not in self.exp_avg_ipt:
                raise RuntimeError("no sensitivity recorded yet: update_and_allocate runs update_ipt first")
            s_a = (self.exp_avg_ipt[a] * self.exp_avg_unc[a]).mean(dim=1)
            s_b = (self.exp_avg_ipt[b] * self.exp_avg_unc[b]).mean(dim=0)
            s_e = (self.exp_avg_ipt[e] * self.exp_avg_unc[e]).view(-1)
            scores[layer_name] = s_e + (s_a + s_b)  # peft's order of summation
        return scores

    @torch.no_grad()
    def mask_to_budget(
        self, model: nn.Module, budget: int, *, lambda_grad: bool | None = None
    ) -> dict[str, list[bool]]:
        """Mask all but the ``budget`` highest-scoring triplets of the model: lambda_i = 0 and the layers skip them.

        One host sync for the whole model. Returns the rank pattern ``{layer name: [kept?] * r}``.
        lambda_grad: whether masked singular values keep peft's gradient (default: ``masked_lambda_grad``).
        """
        layers = self._layers(model)
        scores = self.triplet_scores(model)
        flat = torch.cat([scores[name] for name, _ in layers])
        k = self.init_bgt - budget
        if k <= 0:  # nothing to mask (peft's kthvalue would fail on k = 0)
            keep = torch.ones_like(flat, dtype=torch.bool)
        else:
            threshold = torch.kthvalue(flat, k).values
            keep = flat > threshold
        keep_host = keep.cpu()  # the allocation's one sync
        lambda_grad = self.masked_lambda_grad if lambda_grad is None else lambda_grad
        pattern, start = {}, 0
        for name, layer in layers:
            layer_keep = keep[start : start + layer.r]
            layer.lora_E.masked_fill_(~layer_keep.view(-1, 1), 0.0)
            layer.set_triplet_mask(keep_host[start : start + layer.r], lambda_grad=lambda_grad)
            pattern[name] = keep_host[start : start + layer.r].tolist()
            start += layer.r
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]] | None = None) -> None:
        """Zero the masked lambda of a fixed pattern again (peft's final phase) and make the layers skip them."""
        rank_pattern = self.rank_pattern if rank_pattern is None else rank_pattern
        for name, layer in self._layers(model):
            keep = rank_pattern[name]
            mask = layer.triplet_mask
            if mask is None or mask.tolist() != list(keep) or layer.lambda_grad:  # a host-side comparison
                layer.set_triplet_mask(torch.tensor(keep, dtype=torch.bool), lambda_grad=False)
            layer.zero_masked_lambda()

    # ---- AdaLoraModel.update_and_allocate ------------------------------------------------------------------------

    def update_and_allocate(self, model: nn.Module, step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """Update the sensitivities and, when the schedule says so, mask to the budget. Call every step after
        ``loss.backward()`` (peft: after ``optimizer.step()``, before ``optimizer.zero_grad()``).

        Returns (the budget at ``step``, the new rank pattern or None when this step did not allocate).
        """
        c = self.config
        end = c.total_step - c.tfinal
        layers = self._layers(model)
        if step < end:
            self.update_ipt(model)
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(model, budget)
                return budget, self.rank_pattern
            for _, layer in layers:
                if self.masked_lambda_grad:  # peft computes the nudged masked triplets again: so do we
                    if layer.active_rank != layer.r:
                        layer.set_triplet_mask(None)
                else:  # pruning: masks stay, lambda stays zero
                    layer.zero_masked_lambda()
            return budget, None
        if not self._final:  # step == end: the final allocation (forced, as peft's force_mask); fixed from now on
            budget, _ = self.budget_schedule(end)
            self.rank_pattern = self.mask_to_budget(model, budget, lambda_grad=False)
            self.reset_ipt()
            self._final = True
            return budget, self.rank_pattern
        self.mask_using_rank_pattern(model)
        return self.target_bgt, None

    def _layers(self, model: nn.Module) -> list[tuple[str, AdaLoRALinear]]:
        layers = _adalora_layers(model)
        if [name for name, _ in layers] != self._names:
            raise ValueError("the model's AdaLoRALinear layers are not the ones this allocator was built for")
        return layers

    def __repr__(self) -> str:
        c = self.config
        return (
            f"RankAllocator(layers={len(self._names)}, init_bgt={self.init_bgt}, target_bgt={self.target_bgt}, "
            f"tinit={c.tinit}, tfinal={c.tfinal}, deltaT={c.deltaT}, total_step={c.total_step}, "
            f"beta1={c.beta1}, beta2={c.beta2}, masked_lambda_grad={self.masked_lambda_grad})"
        )


def orth_reg(model: nn.Module, form: str = "paper") -> Tensor:
    """AdaLoRA's orthogonality penalty over every ``AdaLoRALinear`` of ``model`` (differentiable, float32 or wider).

    form="paper" (the paper's Eq. 4, summed over layers as in its loss): ``sum ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``.
    form="peft": what peft's ``AdaLoraModel.forward`` adds (times ``orth_reg_weight``): the mean over all P and Q
    of the *unsquared* ``||P^T P - I||_F`` / ``||Q Q^T - I||_F``.

    Vectorised: the P (and Q) of equal shape are stacked and their Gram matrices taken in one batched matmul, and
    all the norms are reduced together; a model whose layers share a few shapes costs a few launches, not 2 per layer.
    """
    if form not in _ORTH_REG_FORMS:
        raise ValueError(f"form must be one of {_ORTH_REG_FORMS}, got {form!r}")
    groups: dict[tuple, list[Tensor]] = {}
    for _, layer in _adalora_layers(model):
        for kind, p in (("P", layer.lora_B), ("Q", layer.lora_A)):
            groups.setdefault((kind, tuple(p.shape), p.dtype, p.device), []).append(p)
    residuals = []
    for (kind, _, dtype, device), ps in groups.items():
        compute = torch.promote_types(dtype, torch.float32)
        stack = (torch.stack(ps) if len(ps) > 1 else ps[0].unsqueeze(0)).to(compute)  # [g, N, r] or [g, r, K]
        gram = stack.mT @ stack if kind == "P" else stack @ stack.mT  # [g, r, r]
        eye = torch.eye(gram.shape[-1], dtype=compute, device=device)
        residuals.append(gram - eye)
    if form == "paper":
        return sum(r.square().sum() for r in residuals)
    norms = [torch.linalg.matrix_norm(r, ord="fro") for r in residuals]  # [g] per group
    return sum(n.sum() for n in norms) / sum(n.numel() for n in norms)
