"""``MultiLoRALinear``: an ``nn.Linear`` serving a pool of adapters, one per request; ``serve_batch`` for a model."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import Tensor, nn

from ..ops.multi_lora.batch import AdapterBatch
from ..ops.multi_lora.op import multi_lora_linear
from .pool import AdapterPool


class MultiLoRALinear(nn.Module):
    """``nn.Linear`` + ``AdapterPool``: row ``t`` gets ``x W0^T + bias + s_t (x A_i[:b_t]^T) B_i[:, :b_t]^T``.

    ``forward(x, adapter_ids=None, ranks=None)``: ``adapter_ids`` per row of a ``[M, K]`` x (decode) or per sequence of
    a ``[batch, seq, K]`` x (prefill): slots, adapter names or None/-1 (no adapter); or a prebuilt ``AdapterBatch``.
    ``ranks``: per-request active ranks (DyLoRA serving). Without ids, the ids set by ``serve_batch`` on the model are
    used, and outside it every row runs the base layer alone. The weight and bias are shared with the wrapped
    ``nn.Linear`` and frozen; the state dict is that of the ``nn.Linear`` (adapters live in the pool, loaded by
    ``add_adapter``). Inference only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        max_rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._init(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype), capacity, max_rank)

    @classmethod
    def from_linear(cls, linear: nn.Linear, capacity: int, max_rank: int) -> MultiLoRALinear:
        """Wrap ``linear``'s weight and bias (shared, not copied, frozen) with an empty pool on its device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(linear, capacity, max_rank)
        return self

    def _init(self, linear: nn.Linear, capacity: int, max_rank: int) -> None:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.pool = AdapterPool.for_linear(linear, capacity, max_rank)
        self._serving: ServeBatch | None = None  # set by serve_batch

    # ---- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, lora_A, lora_B, alpha: float, magnitude: Tensor | None = None,
                    rslora: bool = False) -> int:  # fmt: skip
        """Load an adapter (peft's ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``); see ``AdapterPool.add``."""
        return self.pool.add(name, lora_A, lora_B, alpha, magnitude=magnitude, rslora=rslora)

    def remove_adapter(self, name: str) -> int:
        return self.pool.remove(name)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_ids=None, ranks=None) -> Tensor:
        if isinstance(adapter_ids, AdapterBatch):
            if ranks is not None:
                raise ValueError("ranks must be None with a prebuilt AdapterBatch (its ranks were set by build)")
            batch = adapter_ids
        elif adapter_ids is not None:
            batch = AdapterBatch.build(self.pool, adapter_ids, ranks, seq_lens=_seq_lens(x, _count(adapter_ids)))
        elif self._serving is not None:
            batch = self._serving.batch_for(self.pool, x)
        else:
            if ranks is not None:
                raise ValueError("ranks were given without adapter_ids")
            return nn.functional.linear(x, self.weight, self.bias)
        return multi_lora_linear(x, self.weight, self.bias, self.pool, batch)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"capacity={self.pool.capacity}, max_rank={self.pool.max_rank}, adapters={sorted(self.pool.names)}"
        )


def _count(adapter_ids) -> int:
    try:
        return len(adapter_ids)
    except TypeError:
        raise TypeError(f"adapter_ids must be a sequence, a 1-D tensor or an AdapterBatch, got "
                        f"{type(adapter_ids).__name__}") from None  # fmt: skip


def _seq_lens(x: Tensor, n_ids: int) -> int | None:
    """How ``n_ids`` ids map onto x's rows: one per row (None), or one per leading sequence of ``[batch, seq, K]``."""
    rows = math.prod(x.shape[:-1])
    if n_ids == rows:
        return None
    if x.dim() >= 3 and n_ids == x.shape[0]:
        return rows // n_ids
    raise ValueError(f"adapter_ids has {n_ids} entries but x {tuple(x.shape)} has {rows} rows"
                     + (f" and {x.shape[0]} sequences" if x.dim() >= 3 else ""))  # fmt: skip


class ServeBatch:
    """The adapter ids of the batch a model is serving (what ``serve_batch`` sets on each ``MultiLoRALinear``).

    Builds an ``AdapterBatch`` on first use per (pool signature, row layout, device) and hands the same one to every
    layer with that signature: one validation and one host-to-device copy per batch, not per layer. ``update_``
    refills the built batches in place (same number of requests and rows), so CUDA graphs captured on them replay the
    new batch. Building copies to the device, which a graph capture cannot do: run the model once before capturing.
    """

    def __init__(self, adapter_ids, ranks=None) -> None:
        self.prebuilt = adapter_ids if isinstance(adapter_ids, AdapterBatch) else None
        if self.prebuilt is not None and ranks is not None:
            raise ValueError("ranks must be None with a prebuilt AdapterBatch (its ranks were set by build)")
        self.adapter_ids, self.ranks = adapter_ids, ranks
        self._built: dict[tuple, tuple[AdapterPool, AdapterBatch]] = {}

    @property
    def batches(self) -> list[AdapterBatch]:
        """The batches built so far (one per distinct pool signature and row layout)."""
        return [batch for _, batch in self._built.values()]

    def batch_for(self, pool: AdapterPool, x: Tensor) -> AdapterBatch:
        if self.prebuilt is not None:
            return self.prebuilt
        seq_lens = _seq_lens(x, _count(self.adapter_ids))
        key = (pool.signature, seq_lens, str(pool.device))
        if key not in self._built:
            self._built[key] = (pool, AdapterBatch.build(pool, self.adapter_ids, self.ranks, seq_lens=seq_lens))
        return self._built[key][1]

    def update_(self, adapter_ids, ranks=None) -> None:
        """Serve ``adapter_ids`` (and ``ranks``) with the batches already built, refilled in place.

        As many requests as before, each with its row count; the pools may have changed since (adapters loaded or
        removed). Every batch is validated before any is changed.
        """
        if self.prebuilt is not None:
            raise ValueError("this serve_batch was given a prebuilt AdapterBatch: refill it with batch.copy_(new)")
        if _count(adapter_ids) != _count(self.adapter_ids):
            raise ValueError(f"update_ needs as many adapter_ids as the batch it refills ({_count(self.adapter_ids)}), "
                             f"got {_count(adapter_ids)}")  # fmt: skip
        fresh = [(key, pool, batch, AdapterBatch.build(pool, adapter_ids, ranks, seq_lens=key[1]))
                 for key, (pool, batch) in self._built.items()]  # fmt: skip
        for _, _, batch, new in fresh:
            batch.check_copy(new)
        self.adapter_ids, self.ranks = adapter_ids, ranks
        self._built = {}
        for key, pool, batch, new in fresh:
            self._built[(new.signature, *key[1:])] = (pool, batch.copy_(new))


def multi_lora_layers(model: nn.Module) -> list[tuple[str, MultiLoRALinear]]:
    """Every ``MultiLoRALinear`` in ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


@contextlib.contextmanager
def serve_batch(model: nn.Module, adapter_ids, ranks=None) -> Iterator[ServeBatch]:
    """Within the block, every ``MultiLoRALinear`` of ``model`` serves ``adapter_ids`` (and ``ranks``).

    ``adapter_ids``: per request, as ``AdapterBatch.build`` takes them (slots, names, None/-1), or a prebuilt
    ``AdapterBatch`` used by every layer as is. The metadata is built on first use per pool signature and reused by
    all layers with that signature (layers loaded with the same adapters share it). Yields the ``ServeBatch``, whose
    ``update_(ids)`` serves a new batch of the same size in place (CUDA-graph replays). Nests; restores on exit.
    """
    layers = multi_lora_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) contains no MultiLoRALinear layer")
    state = ServeBatch(adapter_ids, ranks)
    previous = [m._serving for _, m in layers]
    for _, m in layers:
        m._serving = state
    try:
        yield state
    finally:
        for (_, m), prev in zip(layers, previous, strict=True):
            m._serving = prev
