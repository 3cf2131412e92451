"""DyLoRA training helpers (DyLoRA paper, Algorithm 1).

DyLoRA trains one LoRA adapter of allocated rank ``r`` so that *every* truncation ``b <= r`` of it is usable:
each training step samples an active rank ``b ~ p_B`` and runs the forward/backward pass with only
``A[:b]`` and ``B[:, :b]`` (scale ``alpha / b``). In *frozen* mode only row ``b-1`` of A and column ``b-1``
of B are updated (paper Eq. 10); otherwise all of ``A[:b]`` and ``B[:, :b]`` are. At inference any ``b`` may
be chosen.

Typical loop::

    sampler = RankSampler(1, 8, seed=0)
    for x, y in data:
        sampler.apply(model)           # sample b and set it on every LoRALinear of the model
        loss = loss_fn(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad()
    set_model_rank(model, 4)           # serve the rank-4 truncation

Frozen mode and optimizers: the ranks below ``b - 1`` get a zero gradient, not none (A and B are single
tensors). SGD without momentum or weight decay then leaves them exactly as they are; Adam/AdamW keep moving
them from their running moments (and weight decay), as the paper's PyTorch code does too. For strictly frozen
lower ranks, use such an optimizer for the frozen phase or reset the optimizer state when entering it.
"""

from __future__ import annotations

import random
from itertools import accumulate

from torch import nn

from lowrank_kernels.modules.lora import LoRALinear

__all__ = ["RankSampler", "set_model_rank"]

_DISTRIBUTIONS = ("uniform", "geometric")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class RankSampler:
    """Samples the active rank ``b`` in ``[r_min, r_max]`` (inclusive) for each DyLoRA training step.

    This is the paper's ``p_B``, the distribution the truncation rank is drawn from:

    * ``"uniform"``: every ``b`` in ``[r_min, r_max]`` equally likely (what the paper uses in its experiments).
    * ``"geometric"``: a geometric distribution truncated to the range,
      ``P(b) proportional to geometric_p * (1 - geometric_p) ** (b - r_min)``; it favours small ranks, which
      then get trained more often (``geometric_p`` is the success probability: larger means more mass on
      ``r_min``).

    The sampler owns its ``random.Random``, so a given ``seed`` reproduces the same sequence of ranks across
    runs and is unaffected by (and does not affect) the global ``random`` / ``torch`` RNG state.
    ``seed=None`` seeds from system entropy.
    """

    def __init__(
        self,
        r_min: int,
        r_max: int,
        distribution: str = "uniform",
        geometric_p: float = 0.15,
        seed: int | None = None,
    ) -> None:
        if not _is_int(r_min) or r_min < 1:
            raise ValueError(f"r_min must be an integer >= 1, got {r_min!r}")
        if not _is_int(r_max) or r_max < r_min:
            raise ValueError(f"r_max must be an integer >= r_min ({r_min}), got {r_max!r}")
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        if isinstance(geometric_p, bool) or not isinstance(geometric_p, (int, float)) or not 0.0 < geometric_p <= 1.0:
            raise ValueError(f"geometric_p must be a float in (0, 1], got {geometric_p!r}")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.r_min = r_min
        self.r_max = r_max
        self.distribution = distribution
        self.geometric_p = float(geometric_p)
        self.seed = seed
        self._rng = random.Random(seed)
        self._ranks = list(range(r_min, r_max + 1))
        self._cum_weights = list(accumulate(self.probabilities().values()))

    def probabilities(self) -> dict[int, float]:
        """The probability of each rank ``b`` (sums to 1)."""
        if self.distribution == "uniform":
            w = [1.0] * len(self._ranks)
        else:
            q = 1.0 - self.geometric_p
            w = [self.geometric_p * q ** (b - self.r_min) for b in self._ranks]
        total = sum(w)
        return {b: wi / total for b, wi in zip(self._ranks, w, strict=True)}

    def sample(self) -> int:
        """Draw one rank ``b`` in ``[r_min, r_max]``."""
        if self.distribution == "uniform":
            return self._rng.randint(self.r_min, self.r_max)
        return self._rng.choices(self._ranks, cum_weights=self._cum_weights)[0]

    def apply(self, model: nn.Module, frozen: bool = False) -> int:
        """One DyLoRA step's rank choice: sample ``b`` and set it on every ``LoRALinear`` of ``model``.

        Returns the sampled ``b``. Call once per training step, before the forward pass.
        """
        b = self.sample()
        set_model_rank(model, b, frozen=frozen)
        return b

    def __repr__(self) -> str:
        extra = f", geometric_p={self.geometric_p}" if self.distribution == "geometric" else ""
        return f"RankSampler(r_min={self.r_min}, r_max={self.r_max}, distribution={self.distribution!r}{extra})"


def set_model_rank(model: nn.Module, b: int, frozen: bool = False) -> int:
    """Set active rank ``b`` (and DyLoRA frozen mode) on every ``LoRALinear`` in ``model``.

    Returns the number of layers set. Raises ``ValueError`` if the model has no ``LoRALinear``, or if ``b`` is
    not an integer in ``[1, r]`` for some layer (the message names the layer), and ``RuntimeError`` if a layer
    is merged (``unmerge()`` it first); in those cases no layer is changed.
    """
    if not _is_int(b) or b < 1:
        raise ValueError(f"b must be an integer >= 1, got {b!r}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no LoRALinear layer")
    for name, m in layers:
        if b > m.r:
            raise ValueError(f"b={b} exceeds the allocated rank r={m.r} of layer {name or '<root>'!r}")
        if getattr(m, "merged", False):
            raise RuntimeError(f"layer {name or '<root>'!r} is merged: unmerge() it before changing its rank")
    for _, m in layers:
        m.set_rank(b, frozen=frozen)
    return len(layers)
