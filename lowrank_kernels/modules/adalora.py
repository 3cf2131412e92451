"""``AdaLoRALinear``: peft's AdaLoRA ``SVDLinear`` as a drop-in ``nn.Linear``, computed by the fused LoRA op.

AdaLoRA parameterises the update in SVD form, ``delta W = P diag(lambda) Q``, and prunes the least
important triplets ``(P[:, i], lambda_i, Q[i])`` during training (``lowrank_kernels.training.adalora.RankAllocator``)::

    y = x W0^T + bias + s' * ((drop(x) Q^T) * (lambda * keep)) P^T,    s' = scaling / (ranknum + 1e-5)

with peft's names and shapes: ``lora_A`` = Q [r, in], ``lora_B`` = P [out, r], ``lora_E`` = lambda [r, 1], the frozen
``ranknum`` [1] (= r) and ``scaling`` = alpha. That is ``lora_linear`` with the per-rank scale vector
``rank_scale = lambda`` and ``scale = s'``; ``keep`` [r] is the triplet mask the allocator sets (all ones until it
masks anything).

Masked triplets are skipped, not multiplied by zero
----------------------------------------------------
peft computes all ``r`` ranks every step and masks by zeroing lambda_i. Here the allocator records the mask once,
when it masks (``set_triplet_mask``), as a device index vector of the kept triplets; each forward gathers
``Q[idx]``, ``P[:, idx]``, ``lambda[idx]`` (``b (in + out + 1)`` elements, three tiny launches; autograd scatters
their gradients back into the full parameters) and runs ``lora_linear`` at rank ``b`` = the kept count. Nothing
in the forward looks at lambda's values, so there is no ``nonzero()`` and no host sync per step. Without a mask
there is no gather at all, and when the kept triplets happen to be a prefix ``0..b-1`` the op runs the truncated
rank ``b`` on the parameters themselves (no gather either).

Why a gather and not a permutation that keeps the active triplets a prefix: permuting ``lora_A``/``lora_B``/``lora_E``
in place would also have to permute the optimizer's state (Adam's moments are positional) and the allocator's
EMAs, and it would move triplets away from the positions peft's ``rank_pattern`` and state dicts refer to. The
gather costs ``b (in + out)`` element copies per call, against ``M (in + out) b`` flops for the adapter itself; at
decode sizes its three launches can cost more than the masked ranks save, so for inference ``compact()`` does the
permutation once (after training, when no optimizer state is left to keep in step) and the gather disappears.

Gradients of masked triplets (``lambda_grad``)
----------------------------------------------
With lambda_i = 0 the gradient of the forward above with respect to ``P[:, i]`` and ``Q[i]`` is exactly zero, and so
it is in the skipped computation. But peft's lambda_i still receives
``d lambda_i = s' sum_m (drop(x) Q_i^T)_m (dy P_i)_m`` (generally non-zero): its optimizer nudges lambda_i off zero,
and the allocator's sensitivity ``|lambda_i * d lambda_i|`` is how a pruned triplet can win back its place (the
paper's Algorithm 1 steps every lambda by its gradient, then truncates: ``T(Lambda - eta grad, S)``).
``set_triplet_mask(keep, lambda_grad=True)`` keeps that gradient: the masked triplets cost nothing in the forward,
and in the backward only two thin products at the masked count (``drop(x) Q_m^T`` and ``dy P_m``: no expand, no
weight gradients), a straight-through gradient through the mask. ``lambda_grad=False`` skips them completely (then
d lambda_i = 0: pure pruning). The allocator uses the first while it still reallocates and the second once the final
pattern is fixed, where peft's d lambda_i of a masked triplet has no effect (it zeroes lambda_i after every step).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.lora.naive import cast
from ..ops.lora.op import dropout_mask, lora_linear
from .lora import linear_layout, parameter, peft_alias
from .merge import DeltaMerge

__all__ = ["AdaLoRALinear"]

RANKNUM_EPS = 1e-5  # peft's ``scaling / (ranknum + 1e-5)``


class _MaskedLambdaGrad(torch.autograd.Function):
    """Identity on ``y``; in backward, peft's gradient of the masked singular values (see the module docstring).

    y: [..., N] (the layer's output, passed through), x: [..., K], lora_A_masked: [m, K] (Q of the masked
    triplets), lora_B_masked: [N, m] (P), lora_E_masked: [m] (lambda, only so autograd routes its gradient back;
    its value is unused). Returns y; backward gives ``d lambda_m = s' sum_rows (drop(x) Q_m^T) * (dy P_m)``, and
    zero gradients for Q_m and P_m when ``zero_PQ_grads`` (every triplet masked: nothing else gives P, Q one, and
    peft's is zeros, which an optimizer with momentum or weight decay treats differently from none).
    """

    @staticmethod
    def forward(ctx, y, x, lora_A_masked, lora_B_masked, lora_E_masked, scale, dropout, seed, zero_PQ_grads):
        ctx.save_for_backward(x, lora_A_masked, lora_B_masked)
        ctx.args = (scale, dropout, seed, lora_E_masked.dtype, zero_PQ_grads)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, Q, P = ctx.saved_tensors
        scale, dropout, seed, e_dtype, zero_PQ_grads = ctx.args
        compute = torch.promote_types(x.dtype, torch.float32)
        x2d = x.reshape(-1, x.shape[-1])
        if dropout > 0.0:  # the mask lora_linear applied for the same seed, rebuilt (it is a hash, not saved)
            x2d = (x2d * dropout_mask(seed, tuple(x2d.shape), dropout, x.device)).to(x.dtype)
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        # Two thin GEMMs in the input dtype (fp32 accumulation), so x and dy are read once and never copied to fp32;
        # only the [M, m] products are widened.
        xq = (x2d @ Q.to(x2d.dtype).t()).to(compute)
        dyp = (dy @ P.to(dy.dtype)).to(compute)
        d_lambda = scale * (xq * dyp).sum(0)
        dQ, dP = (torch.zeros_like(Q), torch.zeros_like(P)) if zero_PQ_grads else (None, None)
        return grad_y, None, dQ, dP, d_lambda.to(e_dtype), None, None, None, None


def _adalora_args(alpha, dropout, lora_alpha, lora_dropout) -> tuple[float, float]:
    return (peft_alias("alpha", alpha, "lora_alpha", lora_alpha, 8.0),
            peft_alias("dropout", dropout, "lora_dropout", lora_dropout, 0.0))  # fmt: skip


class AdaLoRALinear(DeltaMerge, nn.Module):
    """``y = x W0^T + bias + s' * (drop(x) (Q * (lambda * keep))^T) P^T`` with a frozen ``W0`` (peft's ``SVDLinear``).

    Parameters, named and shaped as peft's ``SVDLinear`` names them (without the adapter-name key): ``lora_A`` = Q
    [r, in] and ``lora_B`` = P [out, r] (peft's init: normal, std 0.02), ``lora_E`` = lambda [r, 1] (zeros), and the
    non-trainable ``ranknum`` [1] = r. ``scaling`` = alpha (r when alpha <= 0, as peft), and the scale applied is
    ``scale = scaling / (ranknum + 1e-5)``; masking does not change it (peft never changes ``ranknum``).
    Same forward signature and attributes as ``nn.Linear``; adapters kept in float32 on a low-precision base are cast
    to the input's dtype per call. ``set_triplet_mask`` (called by the allocator) makes masked triplets free.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float | None = None,
        dropout: float | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        lora_alpha: float | None = None,
        lora_dropout: float | None = None,
    ) -> None:
        """alpha (default 8) and dropout (default 0) may be given by peft's names ``lora_alpha``, ``lora_dropout``."""
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(base, r, *_adalora_args(alpha, dropout, lora_alpha, lora_dropout))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float | None = None,
        dropout: float | None = None,
        *,
        lora_alpha: float | None = None,
        lora_dropout: float | None = None,
    ) -> AdaLoRALinear:
        """Wrap ``linear``'s weight and bias (shared, not copied) and freeze them. Defaults are peft's
        (``AdaLoraConfig``: ``lora_alpha=8``, ``lora_dropout=0.0``; peft's names accepted too); ``r`` is peft's
        ``init_r`` (default 12 there)."""
        args = _adalora_args(alpha, dropout, lora_alpha, lora_dropout)
        linear_layout(linear, quantized=False)  # nn.Linear or Conv1D; not a 4-bit base
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(linear, r, *args)
        return self

    def _init(self, linear: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
        if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features, self.fan_in_fan_out = linear_layout(linear, quantized=False)
        self.r, self.lora_alpha, self.lora_dropout = r, float(alpha), float(dropout)
        self.scaling = float(alpha) if alpha > 0 else float(r)  # peft: lora_alpha if lora_alpha > 0 else float(r)
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.empty(r, 1, **factory))  # lambda: singular values
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # P: left singular vectors
        self.ranknum = nn.Parameter(torch.full((1,), float(r), **factory), requires_grad=False)
        self._ranknum = float(r)  # host copy, so the forward reads no device scalar; refreshed on load_state_dict
        self.register_load_state_dict_post_hook(_refresh_ranknum)
        self.reset_lora_parameters()
        # Triplet mask (set_triplet_mask). Non-persistent buffers: they follow .to(device) but stay out of the
        # state dict, which is exactly peft's (a masked triplet is a zero in lora_E there).
        self.register_buffer("triplet_keep", None, persistent=False)  # bool [r] on the device | None: all kept
        self.register_buffer("active_idx", None, persistent=False)  # int64 [b]: kept triplets | None: no gather
        self.register_buffer("masked_idx", None, persistent=False)  # int64 [r-b] when lambda_grad | None
        self._keep_host: Tensor | None = None
        self._active_rank = r  # triplets computed per call: the gathered count, or the prefix length
        self._lambda_grad = False
        self.merged = False
        self._weight_before_merge: Tensor | None = None  # kept only for low-precision weights (see merge)

    def reset_lora_parameters(self) -> None:
        """peft's ``AdaLoraLayer.reset_lora_parameters``: lambda zeros, Q and P normal (mean 0, std 0.02).

        With lambda = 0 the layer starts equal to W0 and P, Q get no gradient until lambda moves.
        """
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @property
    def scale(self) -> float:
        """The scale the adapter term is multiplied by: ``scaling / (ranknum + 1e-5)`` (peft's forward)."""
        return self.scaling / (self._ranknum + RANKNUM_EPS)

    # ---- triplet mask -----------------------------------------------------------------------------------------

    @property
    def triplet_mask(self) -> Tensor | None:
        """The kept triplets (bool [r] on the CPU), or None when none is masked."""
        return None if self._keep_host is None else self._keep_host.clone()

    @property
    def active_rank(self) -> int:
        """Number of triplets each call computes (r without a mask)."""
        return self._active_rank

    @property
    def lambda_grad(self) -> bool:
        """Whether masked singular values still get peft's gradient (see the module docstring)."""
        return self._lambda_grad

    def set_triplet_mask(self, keep: Tensor | Sequence[bool] | None, *, lambda_grad: bool = False) -> None:
        """Compute only the triplets with ``keep[i]`` from now on (``None``: all of them).

        keep: bool [r] (a device tensor costs one sync here, never in the forward). lambda_grad: masked lambda_i
        still get peft's gradient (two thin products at the masked count in the backward), else nothing.
        Leaves lambda's values alone (the allocator zeroes masked ones, as peft does; ``zero_masked_lambda``); while a
        triplet is masked it contributes nothing to the output or to ``delta_weight`` whatever its lambda is.
        """
        if self.merged:
            raise RuntimeError("set_triplet_mask on a merged AdaLoRALinear: unmerge() first")
        device = self.lora_A.device
        if keep is None:
            keep_host = None
        else:
            keep_host = torch.as_tensor(keep).detach().to("cpu").reshape(-1)
            if keep_host.dtype != torch.bool or keep_host.numel() != self.r:
                raise ValueError(
                    f"keep must be a bool mask of {self.r} triplets, got {keep_host.dtype} {keep_host.numel()}"
                )
            if bool(keep_host.all()):
                keep_host = None
        self._lambda_grad = bool(lambda_grad)
        if keep_host is None:
            self._keep_host = self.triplet_keep = self.active_idx = self.masked_idx = None
            self._active_rank = self.r
            return
        b = int(keep_host.sum())
        self._keep_host = keep_host
        self._active_rank = b
        self.triplet_keep = _to_device(keep_host, device)
        is_prefix = bool(keep_host[:b].all())  # the kept triplets are 0..b-1: truncated rank, no gather
        self.active_idx = None if is_prefix else _to_device(keep_host.nonzero().view(-1), device)
        self.masked_idx = _to_device((~keep_host).nonzero().view(-1), device) if lambda_grad else None

    @torch.no_grad()
    def compact(self) -> Tensor | None:
        """Reorder the triplets so the kept ones come first; then masked triplets cost nothing, not even a gather.

        A permutation of P's columns, Q's rows and lambda (and of the mask): the layer computes the same function
        and its state dict still loads into peft. For inference, or before an optimizer exists: an optimizer's
        state, an allocator's statistics and a peft ``rank_pattern`` are positional and are not permuted.
        Returns the permutation (``new[i] = old[perm[i]]``, int64 [r] on the CPU), or None without a mask.
        """
        if self.merged:
            raise RuntimeError("compact on a merged AdaLoRALinear: unmerge() first")
        keep = self._keep_host
        if keep is None:
            return None
        perm = torch.cat([keep.nonzero(), (~keep).nonzero()]).view(-1)
        index = perm.to(self.lora_A.device)
        self.lora_A.copy_(self.lora_A.index_select(0, index))
        self.lora_B.copy_(self.lora_B.index_select(1, index))
        self.lora_E.copy_(self.lora_E.index_select(0, index))
        self.set_triplet_mask(keep[perm], lambda_grad=self._lambda_grad)
        return perm

    @torch.no_grad()
    def zero_masked_lambda(self) -> None:
        """Set lambda_i = 0 for every masked triplet (peft's ``masked_fill_``); no host sync."""
        if self.triplet_keep is not None:
            self.lora_E.masked_fill_(~self.triplet_keep.view(-1, 1), 0.0)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return nn.functional.linear(x, self.base_weight, self.bias)
        dtype = x.dtype
        dropout = self.lora_dropout if self.training else 0.0
        A, B, E = parameter(self, "lora_A"), parameter(self, "lora_B"), parameter(self, "lora_E").view(-1)
        idx = self.active_idx
        if idx is not None:  # tiny gathers; their backward scatters the gradients into the full parameters
            A, B, E = A.index_select(0, idx), B.index_select(1, idx), E.index_select(0, idx)
        side = self.masked_idx is not None and torch.is_grad_enabled() and self.lora_E.requires_grad
        seed = None
        if side and dropout > 0.0:  # drawn here so the masked-lambda backward rebuilds lora_linear's dropout mask
            seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        if self._active_rank == 0:  # every triplet masked: the adapter term is zero
            y = nn.functional.linear(x, self.base_weight, self.bias)
        else:
            y = lora_linear(
                x,
                self.base_weight,
                parameter(self, "bias"),
                cast(A, dtype),
                cast(B, dtype),
                scale=self.scale,
                rank=self._active_rank if idx is None else None,
                rank_scale=cast(E, dtype),
                dropout=dropout,
                seed=seed,
            )
        if side:
            m = self.masked_idx
            y = _MaskedLambdaGrad.apply(y, x, self.lora_A.index_select(0, m), self.lora_B.index_select(1, m),
                                        self.lora_E.view(-1).index_select(0, m), self.scale, dropout, seed,
                                        self._active_rank == 0)  # fmt: skip
        return y

    # ---- merge ------------------------------------------------------------------------------------------------

    @property
    def base_weight(self) -> Tensor:
        """W0 as [out, in]: ``weight`` itself, or a transposed view of a Conv1D's [in, out] weight."""
        weight = parameter(self, "weight")
        return weight.t() if self.fan_in_fan_out else weight

    def delta_weight(self) -> Tensor:
        """``s' * P (Q * (lambda * keep))`` in float32 (float64 for a float64 layer), in ``weight``'s layout ([out,
        in], or [in, out] for a Conv1D base): peft's ``get_delta_weight`` over the kept triplets."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.no_grad():
            lam = self.lora_E.to(dtype)
            if self.triplet_keep is not None:
                lam = lam * self.triplet_keep.view(-1, 1)
            delta = self.scale * (self.lora_B.to(dtype) @ (self.lora_A.to(dtype) * lam))
            return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, active_rank={self.active_rank}, alpha={self.lora_alpha}, dropout={self.lora_dropout}, "
            f"lambda_grad={self._lambda_grad}, merged={self.merged}"
        )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a sync: through pinned memory, non-blocking (the caching host allocator keeps the
    staging buffer alive until the copy has run)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _refresh_ranknum(module: AdaLoRALinear, incompatible_keys) -> None:
    module._ranknum = float(module.ranknum.detach().reshape(-1)[0])
