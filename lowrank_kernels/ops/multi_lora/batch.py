"""``AdapterBatch``: the row -> adapter metadata of one batch, validated and laid out once, on the device.

Built once per batch (``AdapterBatch.build(pool, adapter_ids, ranks)``): it validates every id and rank on the host,
before any kernel can see them, sorts the rows by adapter (Punica's SGMV segments, so each adapter's weights are read
once per group of rows that use it) and cuts the segments into row tiles for the kernels. Everything goes to the
device in one copy; every layer of the model then launches on it with no host-device sync, and its sizes depend only
on the number of rows and the pool's capacity, so ``copy_`` can refill a captured batch in place.

``pool`` is any object with the ``AdapterPool`` interface (``modules/pool.py``): capacity, slots, names, untargeted,
signature, device. Math and notation: ``naive.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..._checks import is_int as _is_int
from .naive import BatchTensors, adapter_scale

NO_ADAPTER = -1


# ----------------------------------------------------------------------------------------------------------------
# Batch metadata
# ----------------------------------------------------------------------------------------------------------------

# Rows per kernel tile: decode batches have short segments (one row per request), prefill long runs per adapter.
# A function of the row count only, so a batch refilled in place (copy_) keeps its layout.
SMALL_BATCH_BLOCK_M = 16  # tl.dot's minimum; at M <= 256 a segment is rarely longer
LARGE_BATCH_BLOCK_M = 64
SMALL_BATCH_MAX_ROWS = 256


def segment_block_m(num_rows: int) -> int:
    """Rows per tile of the gather-matmul kernels for a batch of ``num_rows`` rows."""
    return SMALL_BATCH_BLOCK_M if num_rows <= SMALL_BATCH_MAX_ROWS else LARGE_BATCH_BLOCK_M


def max_tiles(num_rows: int, capacity: int) -> int:
    """Upper bound on the tiles of any batch of ``num_rows`` rows over a ``capacity``-slot pool.

    With S <= min(M, capacity) segments, sum_s cdiv(len_s, BM) <= cdiv(M, BM) + S - 1.
    """
    if num_rows == 0:
        return 0
    return -(-num_rows // segment_block_m(num_rows)) + min(num_rows, capacity) - 1


def _as_list(name: str, v, n: int | None) -> list:
    if isinstance(v, Tensor):
        if v.dim() > 1:
            raise ValueError(f"{name} must be 1-D (one entry per request), got shape {tuple(v.shape)}")
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {v.dtype}")
        v = v.reshape(-1).tolist()  # one host copy per batch (a device sync if v is on the GPU)
    elif isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"{name} must be a sequence or a 1-D tensor, got {type(v).__name__}")
    v = list(v)
    if n is not None and len(v) != n:
        raise ValueError(f"{name} must have one entry per adapter id ({n}), got {len(v)}")
    return v


class AdapterBatch:
    """Row -> adapter metadata of one batch over one pool signature, validated and laid out once, on the device.

    Device tensors (one buffer, one host-to-device copy; shapes depend only on ``num_rows`` and the pool's capacity):

    - ``row_slot [M]`` int32: the slot of each row (-1: no adapter); ``row_rank [M]`` int32: its active rank ``b_t``
      (0 without adapter); ``row_scale [M]`` float32 (float64 for a float64 pool): ``s_t`` (``alpha / b_t``, rsLoRA
      ``alpha / sqrt(b_t)``).
    - ``sorted_rows [M]`` int32: the rows with an adapter grouped by slot (stable: a request's rows stay in order),
      then the rows without.
    - ``tiles [T, 4]`` int32: ``(slot, start, end, max rank)`` of each run of at most ``block_m`` sorted rows that
      share an adapter; unused tiles (up to the bound ``max_tiles(M, capacity)``) have slot -1.
    - ``slot_rows [capacity, 2]`` int32: each slot's segment ``[start, end)`` of ``sorted_rows`` (start == end: no
      row uses it); the backward's per-adapter weight gradients run over these.

    Host facts: ``num_rows``, ``num_ids``, ``seq_lens``, ``block_m``, ``num_tiles`` and ``num_segments`` (used),
    ``has_adapter``, ``has_dora`` (some row uses a DoRA adapter), ``signature`` (the pool signature it was validated
    against).
    """

    def __init__(self, packed: Tensor, *, num_rows: int, num_ids: int, seq_lens: tuple[int, ...] | None,
                 num_tiles: int, num_segments: int, has_adapter: bool, has_dora: bool, capacity: int,
                 signature: tuple, scale_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        self._packed = packed
        self.scale_dtype = scale_dtype  # float64 for a float64 pool: the oracle dtype stays float64 end to end
        self.num_rows, self.num_ids, self.seq_lens = num_rows, num_ids, seq_lens
        self.num_tiles, self.num_segments, self.has_adapter = num_tiles, num_segments, has_adapter
        self.has_dora, self.capacity = has_dora, capacity
        self.signature = signature
        self.block_m = segment_block_m(num_rows)
        # Set when a CUDA graph was captured on this batch while it had no adapter rows: the graph then holds no
        # adapter launches, so copy_ must not refill it with rows that need them.
        self.captured_without_adapters = False
        self._set_views()

    def _set_views(self) -> None:
        M = self.num_rows
        p = self._packed
        self.row_slot = p[0:M]
        self.row_rank = p[M : 2 * M]
        end = (2 + self.scale_dtype.itemsize // 4) * M  # a float64 scale takes two int32 words
        self.row_scale = p[2 * M : end].view(self.scale_dtype)
        self.sorted_rows = p[end : end + M]
        self.slot_rows = p[end + M : end + M + 2 * self.capacity].view(-1, 2)
        self.tiles = p[end + M + 2 * self.capacity :].view(-1, 4)

    def tensors(self) -> BatchTensors:
        """The device tensors the primitives take (``naive.BatchTensors``)."""
        return BatchTensors(self.row_slot, self.row_rank, self.row_scale, self.sorted_rows, self.tiles,
                            self.slot_rows, self.block_m)  # fmt: skip

    def note_launch(self, x: Tensor) -> None:
        """Called by the op before each launch on this batch: a CUDA graph captured while the batch has no adapter
        row holds no adapter launch, so the batch remembers it and ``copy_`` refuses a refill with adapter rows."""
        if not self.has_adapter and x.is_cuda and not torch.compiler.is_compiling():
            self.captured_without_adapters |= torch.cuda.is_current_stream_capturing()

    @property
    def device(self) -> torch.device:
        return self._packed.device

    @classmethod
    def build(
        cls,
        pool,
        adapter_ids,
        ranks=None,
        *,
        seq_lens: int | Sequence[int] | None = None,
    ) -> AdapterBatch:
        """Validate and lay out a batch for ``pool`` (and every pool with the same ``signature``).

        adapter_ids: one entry per request: a slot in ``[-1, capacity)`` (-1: no adapter), an adapter name (one
        registered with ``add_untargeted`` means no adapter here), or None (no adapter); a list or a 1-D integer tensor
        (any device). ranks: None (each adapter's own rank), one int for every request, or one per request
        (``1 <= b <= r_i``; ignored where there is no adapter; a DoRA adapter only at its own rank). seq_lens: rows per
        request: None (one row each: decode), an int (a ``[batch, seq, K]`` prefill), or one int per request (packed
        variable-length sequences). Raises ValueError / TypeError / KeyError
        naming the argument and the entry before anything reaches the device.
        """
        if not hasattr(pool, "signature") or not hasattr(pool, "slots"):
            raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
        ids = _as_list("adapter_ids", adapter_ids, None)
        n_ids = len(ids)
        slots, untargeted = pool.slots, pool.untargeted
        row_slot_ids: list[int] = []
        for j, a in enumerate(ids):
            if a is None:
                row_slot_ids.append(NO_ADAPTER)
                continue
            if isinstance(a, str):
                if a in untargeted:  # an adapter without weights here: the base output, as peft
                    row_slot_ids.append(NO_ADAPTER)
                    continue
                if a not in pool:
                    raise KeyError(f"adapter_ids[{j}]: no adapter named {a!r} in the pool; loaded: "
                                   f"{sorted(pool.names) or 'none'}")  # fmt: skip
                row_slot_ids.append(pool.slot(a))
                continue
            if not _is_int(a):
                raise TypeError(f"adapter_ids[{j}] must be an int slot, an adapter name or None, got {a!r}")
            a = int(a)
            if not NO_ADAPTER <= a < pool.capacity:
                raise ValueError(f"adapter_ids[{j}] = {a} is out of range [-1, {pool.capacity}) (the pool's capacity; "
                                 "-1 means no adapter)")  # fmt: skip
            if a >= 0 and slots[a] is None:
                raise ValueError(f"adapter_ids[{j}] = {a} names an empty slot; loaded adapters: {pool.names or 'none'}")
            row_slot_ids.append(a)

        if ranks is None:
            rank_list: list = [None] * n_ids
        elif _is_int(ranks):
            rank_list = [int(ranks)] * n_ids
        else:
            rank_list = _as_list("ranks", ranks, n_ids)
        id_rank, id_scale = [], []
        for j, (a, b) in enumerate(zip(row_slot_ids, rank_list, strict=True)):
            if a == NO_ADAPTER:
                id_rank.append(0)
                id_scale.append(0.0)
                continue
            info = slots[a]
            if b is None:
                b = info.rank
            elif not _is_int(b):
                raise TypeError(f"ranks[{j}] must be an int or None, got {b!r}")
            b = int(b)
            if not 1 <= b <= info.rank:
                raise ValueError(f"ranks[{j}] = {b} is outside [1, {info.rank}], the rank of the adapter in slot {a}")
            if info.dora and b != info.rank:
                raise ValueError(f"ranks[{j}] = {b} truncates the DoRA adapter in slot {a} (rank {info.rank}): its "
                                 "magnitude normalisation belongs to the full rank")  # fmt: skip
            id_rank.append(b)
            id_scale.append(adapter_scale(info.alpha, b, info.rslora))

        if seq_lens is None:
            lens = None
            M = n_ids
        else:
            lens_list = [seq_lens] * n_ids if _is_int(seq_lens) else _as_list("seq_lens", seq_lens, n_ids)
            for j, s in enumerate(lens_list):
                if not _is_int(s) or s < 0:
                    raise ValueError(f"seq_lens[{j}] must be an int >= 0, got {s!r}")
            lens = tuple(int(s) for s in lens_list)
            M = sum(lens)
        return cls._layout(pool, row_slot_ids, id_rank, id_scale, lens, M, n_ids)

    @classmethod
    def _layout(cls, pool, id_slot, id_rank, id_scale, lens, M, n_ids) -> AdapterBatch:
        """Expand per-request entries to rows, group rows by slot, cut tiles, pack and copy to the device once."""
        scale_dtype = torch.float64 if pool.dtype == torch.float64 else torch.float32
        if lens is None:
            row_slot = torch.tensor(id_slot, dtype=torch.int32)
            row_rank = torch.tensor(id_rank, dtype=torch.int32)
            row_scale = torch.tensor(id_scale, dtype=scale_dtype)
        else:
            reps = torch.tensor(lens, dtype=torch.int64)
            row_slot = torch.tensor(id_slot, dtype=torch.int32).repeat_interleave(reps)
            row_rank = torch.tensor(id_rank, dtype=torch.int32).repeat_interleave(reps)
            row_scale = torch.tensor(id_scale, dtype=scale_dtype).repeat_interleave(reps)
        block_m = segment_block_m(M)
        T = max_tiles(M, pool.capacity)
        # Rows without adapter sort last (key = capacity) and are never part of a tile.
        key = torch.where(row_slot < 0, pool.capacity, row_slot.long())
        sorted_rows = torch.sort(key, stable=True).indices
        sorted_key = key[sorted_rows]
        seg_slots, seg_lens = torch.unique_consecutive(sorted_key, return_counts=True)
        sorted_rank = row_rank[sorted_rows].tolist()
        tiles: list[list[int]] = []
        slot_rows = [[0, 0] for _ in range(pool.capacity)]
        n_segments = start = 0
        for s, length in zip(seg_slots.tolist(), seg_lens.tolist(), strict=True):
            if s == pool.capacity:
                break  # the trailing run of rows without adapter
            n_segments += 1
            slot_rows[s] = [start, start + length]
            for a in range(start, start + length, block_m):
                b = min(a + block_m, start + length)
                tiles.append([s, a, b, max(sorted_rank[a:b])])
            start += length
        n_tiles = len(tiles)
        tiles += [[NO_ADAPTER, 0, 0, 0]] * (T - n_tiles)  # fixed size: the kernels' grid never depends on the data
        tiles_t = torch.tensor(tiles, dtype=torch.int32).reshape(-1)
        slot_rows_t = torch.tensor(slot_rows, dtype=torch.int32).reshape(-1)
        packed = torch.cat([row_slot, row_rank, row_scale.view(torch.int32), sorted_rows.to(torch.int32), slot_rows_t,
                            tiles_t])  # fmt: skip
        has_dora = any(pool.slots[s].dora for s in set(id_slot) if s != NO_ADAPTER) and M > 0
        return cls(packed.to(pool.device), num_rows=M, num_ids=n_ids, seq_lens=lens, num_tiles=n_tiles,
                   num_segments=n_segments, has_adapter=n_tiles > 0, has_dora=has_dora and n_tiles > 0,
                   capacity=pool.capacity, signature=pool.signature, scale_dtype=scale_dtype)  # fmt: skip

    def check_copy(self, other: AdapterBatch) -> None:
        """Raise unless ``copy_(other)`` is valid (same layout; adapter rows only if launches can serve them)."""
        if not isinstance(other, AdapterBatch):
            raise TypeError(f"other must be an AdapterBatch, got {type(other).__name__}")
        if other.num_rows != self.num_rows or other._packed.shape != self._packed.shape:
            raise ValueError(f"other has {other.num_rows} rows and {other.tiles.shape[0]} tile slots; this batch has "
                             f"{self.num_rows} and {self.tiles.shape[0]}: copy_ needs the same layout")  # fmt: skip
        if self.captured_without_adapters and other.has_adapter:
            raise ValueError("this batch was captured in a CUDA graph while no row had an adapter, so the graph holds "
                             "no adapter launches: capture on a batch with adapter rows to replay batches that use "
                             "adapters")  # fmt: skip

    @torch.no_grad()
    def copy_(self, other: AdapterBatch) -> AdapterBatch:
        """Refill this batch's device tensors with ``other``'s, in place (for CUDA-graph replays of a new batch).

        Both must have the same number of rows and tile bound (same row count, same pool capacity). Launches captured
        on this batch then serve ``other``: slots, tile extents and ranks are all read on the device. A batch with no
        adapter row launches nothing (in a capture too); such a captured batch refuses ``other`` with adapter rows.
        """
        self.check_copy(other)
        self._packed.copy_(other._packed, non_blocking=True)
        self.num_ids, self.seq_lens, self.signature = other.num_ids, other.seq_lens, other.signature
        self.num_tiles, self.num_segments, self.has_adapter = other.num_tiles, other.num_segments, other.has_adapter
        self.has_dora = other.has_dora
        return self

    def __repr__(self) -> str:
        return (
            f"AdapterBatch(num_rows={self.num_rows}, num_ids={self.num_ids}, segments={self.num_segments}, "
            f"tiles={self.num_tiles}/{self.tiles.shape[0]}, block_m={self.block_m}, device={self.device})"
        )
