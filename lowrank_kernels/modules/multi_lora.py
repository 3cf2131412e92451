"""``MultiLoRALinear``: an ``nn.Linear`` serving (and training) a pool of adapters, one per request or token;
``serve_batch`` (alias ``train_batch``) sets the batch's adapter ids for every such layer of a model."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from torch import Tensor, nn

from ..ops.multi_lora.batch import AdapterBatch
from ..ops.multi_lora.op import multi_lora_linear
from .lora import parameter
from .pool import AdapterPool


class MultiLoRALinear(nn.Module):
    """``nn.Linear`` + ``AdapterPool``: row ``t`` gets ``x W0^T + bias + s_t (x A_i[:b_t]^T) B_i[:, :b_t]^T``.

    ``forward(x, adapter_ids=None, ranks=None)``: ``adapter_ids`` per row of a ``[M, K]`` x (decode) or per sequence of
    a ``[batch, seq, K]`` x (prefill): slots, adapter names or None/-1 (no adapter); or a prebuilt ``AdapterBatch``.
    ``ranks``: per-request active ranks (DyLoRA serving, or DyLoRA-style rank sampling per job in training). Without
    ids, the ids set by ``serve_batch`` on the model are used, and outside it every row runs the base layer alone.
    Ids may also be per token (one per row of the flattened ``[tokens, K]`` input, as vLLM takes them); per-sequence
    ids reach layers that see flattened tokens (OPT's ``fc1``/``fc2``) expanded to their tokens.
    The weight and bias are shared with the wrapped ``nn.Linear`` and frozen. ``trainable=True`` makes the pool's
    stacked tensors parameters (``pool.lora_A``, ``pool.lora_B``, ``pool.magnitude``: see ``AdapterPool``), so one
    optimizer trains every adapter in mixed batches; ``dropout`` is the adapter-input dropout applied in training
    mode (``lora_linear``'s mask over the batch's rows). Without ``trainable`` the state dict is that of the
    ``nn.Linear`` (adapters live in the pool, loaded by ``add_adapter``).
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
        *,
        trainable: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init(linear, capacity, max_rank, trainable, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, capacity: int, max_rank: int, *, trainable: bool = False,
                    dropout: float = 0.0) -> MultiLoRALinear:  # fmt: skip
        """Wrap ``linear``'s weight and bias (shared, not copied, frozen) with an empty pool on its device and dtype.

        ``trainable``: the pool's adapters are ``nn.Parameter``s (see the class); ``dropout``: adapter dropout in
        training mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(linear, capacity, max_rank, trainable, dropout)
        return self

    def _init(self, linear: nn.Linear, capacity: int, max_rank: int, trainable: bool, dropout: float) -> None:
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.pool = AdapterPool.for_linear(linear, capacity, max_rank, trainable=trainable)
        self._serving: ServeBatch | None = None  # set by serve_batch

    # ---- adapters ---------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, lora_A, lora_B, alpha: float, magnitude: Tensor | None = None,
                    rslora: bool = False) -> int:  # fmt: skip
        """Load an adapter (peft's ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``); see ``AdapterPool.add``."""
        return self.pool.add(name, lora_A, lora_B, alpha, magnitude=magnitude, rslora=rslora)

    def remove_adapter(self, name: str) -> int:
        return self.pool.remove(name)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name`` in peft's layout (``lora_A.weight``, ``lora_B.weight``, DoRA's
        ``lora_magnitude_vector``), detached copies: what ``save_peft_adapter`` writes for this layer."""
        return self.pool.peft_state(name)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, adapter_ids=None, ranks=None) -> Tensor:
        pool = self._modules["pool"]  # nn.Module.__getattr__ costs ~0.6 us (see parameter)
        if isinstance(adapter_ids, AdapterBatch):
            if ranks is not None:
                raise ValueError("ranks must be None with a prebuilt AdapterBatch (its ranks were set by build)")
            batch = adapter_ids
        elif adapter_ids is not None:
            adapter_ids = _per_token(adapter_ids)
            batch = AdapterBatch.build(pool, adapter_ids, ranks, seq_lens=_seq_lens(x, _count(adapter_ids)))
        elif self._serving is not None:
            batch = self._serving.batch_for(pool, x)
        else:
            if ranks is not None:
                raise ValueError("ranks were given without adapter_ids")
            return nn.functional.linear(x, self.weight, self.bias)
        dropout = self.dropout if self.training else 0.0
        weight, bias = parameter(self, "weight"), parameter(self, "bias")
        return multi_lora_linear(x, weight, bias, pool, batch, dropout=dropout)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"capacity={self.pool.capacity}, max_rank={self.pool.max_rank}, adapters={sorted(self.pool.names)}"
            + (f", trainable=True, dropout={self.dropout}" if self.pool.trainable else "")
        )


def _count(adapter_ids) -> int:
    try:
        return len(adapter_ids)
    except TypeError:
        raise TypeError(f"adapter_ids must be a sequence, a 1-D tensor or an AdapterBatch, got "
                        f"{type(adapter_ids).__name__}") from None  # fmt: skip


def _per_token(adapter_ids):
    """A 2-D ``[batch, seq]`` tensor of ids (one per token, as vLLM's) becomes the flat per-row list it means."""
    if isinstance(adapter_ids, Tensor) and adapter_ids.dim() == 2:
        return adapter_ids.reshape(-1)
    return adapter_ids


def _seq_lens(x: Tensor, n_ids: int) -> int | None:
    """How ``n_ids`` ids map onto x's rows: one per row or token (None), one per leading sequence of
    ``[batch, seq, K]``, or one per run of equal-length sequences flattened to ``[batch * seq, K]`` (OPT's MLP)."""
    rows = math.prod(x.shape[:-1])
    if n_ids == rows:
        return None
    if x.dim() >= 3 and n_ids == x.shape[0]:
        return rows // n_ids
    if n_ids > 0 and x.dim() == 2 and rows % n_ids == 0:
        return rows // n_ids
    raise ValueError(f"adapter_ids has {n_ids} entries but x {tuple(x.shape)} has {rows} rows"
                     + (f" and {x.shape[0]} sequences" if x.dim() >= 3 else "")
                     + ": give one id per row (token) or per sequence")  # fmt: skip


def _uniform_id(adapter_ids):
    """The one id every request names (an id or a name), or raise: a layer whose rows are not the batch's."""
    ids = adapter_ids.tolist() if isinstance(adapter_ids, Tensor) else list(adapter_ids)
    if ids and all(a == ids[0] for a in ids):
        return ids[0]
    return None


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
        adapter_ids = _per_token(adapter_ids)
        self.adapter_ids, self.ranks = adapter_ids, ranks
        self._built: dict[tuple, tuple[AdapterPool, AdapterBatch]] = {}

    @property
    def batches(self) -> list[AdapterBatch]:
        """The batches built so far (one per distinct pool signature and row layout)."""
        return [batch for _, batch in self._built.values()]

    def batch_for(self, pool: AdapterPool, x: Tensor) -> AdapterBatch:
        if self.prebuilt is not None:
            return self.prebuilt
        ids, ranks = self.adapter_ids, self.ranks
        try:
            seq_lens = _seq_lens(x, _count(ids))
        except ValueError:
            # Rows that are not the batch's (DeBERTa's relative-position embeddings through query_proj, shared by
            # every sequence): well defined only when every request names the same adapter at the same rank.
            uniform = _uniform_id(ids)
            same_rank = ranks is None or isinstance(ranks, int) or _uniform_id(ranks) is not None
            if uniform is None or not same_rank:
                raise ValueError(
                    f"a layer's input {tuple(x.shape)} has rows shared by every request of the batch "
                    f"(not one per request or token, e.g. DeBERTa's relative-position embeddings with "
                    f"share_att_key), so it cannot take {_count(ids)} different adapters: serve such "
                    f"requests in separate batches, or leave this layer untargeted"
                ) from None
            rows = math.prod(x.shape[:-1])
            rank = ranks if ranks is None or isinstance(ranks, int) else _uniform_id(ranks)
            ids, ranks, seq_lens = [uniform], rank, rows
        key = (pool.signature, seq_lens, _count(ids), str(pool.device))
        if key not in self._built:
            self._built[key] = (pool, AdapterBatch.build(pool, ids, ranks, seq_lens=seq_lens))
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
        adapter_ids = _per_token(adapter_ids)
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


train_batch = serve_batch  # the training loop describes its batch exactly as serving does
