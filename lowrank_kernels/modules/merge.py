"""merge()/unmerge() for adapters whose effect is an additive ``delta_weight()`` on the frozen weight."""

from __future__ import annotations

import torch
from torch import Tensor


class DeltaMerge:
    """Mixin for an nn.Module with ``weight``, ``merged``, ``_weight_before_merge`` and ``delta_weight()``.

    ``merge`` folds the delta into ``weight`` in place (forward then costs one ``F.linear``) and refuses a
    non-finite adapter. A float32/float64 weight is restored by subtracting the same delta (within fp32 rounding);
    a lower-precision one keeps its original values (one weight-sized copy) so ``unmerge`` is exact.
    """

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("refusing to merge: the adapter's delta weight has NaN or Inf entries")
        if self.weight.dtype not in (torch.float32, torch.float64):
            self._weight_before_merge = self.weight.detach().clone()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        if self._weight_before_merge is not None:
            self.weight.copy_(self._weight_before_merge)
            self._weight_before_merge = None
        else:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False
