"""The one shape registry that tests and benchmarks share: model layer shapes, token counts, ranks.

Plain data and tiny helpers: this module itself needs only the standard library (the package's ``__init__``
imports torch), so reports and scripts can read it anywhere.

Conventions: a layer is ``nn.Linear(K, N)``: ``x [M, K] -> y [M, N]``, ``W0 [N, K]``;
``r`` is the allocated rank (``lora_A [r, K]``, ``lora_B [N, r]``), ``b <= r`` the active (DyLoRA) rank.
The benchmark matrix (``llama_cases``) and the ahead-of-time compile sweep (``scripts/aot_check.py``: every
specialisation the launchers produce over the model shapes, M values, ranks, dtypes and flags below) read the same
tuples, so what is compiled in CI is what is timed on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple


class LayerShape(NamedTuple):
    """A linear layer ``x [M, K] -> y [M, N]`` (``W0 [N, K]``)."""

    name: str
    K: int  # in_features
    N: int  # out_features

    @property
    def id(self) -> str:
        """``"KxN"``, e.g. ``"4096x11008"``: the form benchmark ids and reports use."""
        return f"{self.K}x{self.N}"


class LoRACase(NamedTuple):
    """One LoRA problem: ``x [M, K]``, ``W0 [N, K]``, allocated rank ``r``, active rank ``b``."""

    M: int
    K: int
    N: int
    r: int
    b: int

    @property
    def id(self) -> str:
        return case_id(self.M, self.K, self.N, self.r, self.b)


# ---- Llama-7B (the benchmark shapes) -----------------------------------------------------------------------------

LLAMA_7B_SHAPES: tuple[LayerShape, ...] = (
    LayerShape("llama7b-attn", 4096, 4096),  # q_proj, k_proj, v_proj, o_proj
    LayerShape("llama7b-mlp-up", 4096, 11008),  # gate_proj, up_proj
    LayerShape("llama7b-mlp-down", 11008, 4096),  # down_proj
)
DECODE_M: tuple[int, ...] = (1, 16, 64)  # tokens per step when serving; timed as CUDA-graph replays too
PREFILL_M: tuple[int, ...] = (2048, 8192)  # prefill / training batches
BENCH_M: tuple[int, ...] = DECODE_M + PREFILL_M
RANKS: tuple[int, ...] = (16, 64)  # allocated ranks r
TRUNCATED_RANK = 8  # the DyLoRA active rank every r is also run at (b in {8, r})
DECODE_MAX_M = max(DECODE_M)  # M at or below this is "decode": the goals and graph timing split here


def active_ranks(r: int) -> tuple[int, ...]:
    """Active ranks ``b`` benchmarked for allocated rank ``r``: ``{8, r}`` (just ``(r,)`` when ``r <= 8``)."""
    return (TRUNCATED_RANK, r) if r > TRUNCATED_RANK else (r,)


def llama_cases(
    shapes: tuple[LayerShape, ...] = LLAMA_7B_SHAPES, Ms: tuple[int, ...] = BENCH_M, ranks: tuple[int, ...] = RANKS
) -> Iterator[tuple[LayerShape, LoRACase]]:
    """Every (shape, M, r, b) of the benchmark matrix, shape-major then M, r, b."""
    for shape in shapes:
        for M in Ms:
            for r in ranks:
                for b in active_ranks(r):
                    yield shape, LoRACase(M, shape.K, shape.N, r, b)


# ---- larger models and the full sweep of the ahead-of-time compile check ----------------------------------------

LLAMA_13B_SHAPES: tuple[LayerShape, ...] = (
    LayerShape("llama13b-attn", 5120, 5120),
    LayerShape("llama13b-mlp-up", 5120, 13824),
    LayerShape("llama13b-mlp-down", 13824, 5120),
)
LLAMA_70B_SHAPES: tuple[LayerShape, ...] = (
    LayerShape("llama70b-attn", 8192, 8192),  # q_proj, o_proj
    LayerShape("llama70b-kv", 8192, 1024),  # k_proj, v_proj (grouped-query attention: 8 KV heads)
    LayerShape("llama70b-mlp-up", 8192, 28672),
    LayerShape("llama70b-mlp-down", 28672, 8192),
)
MODEL_SHAPES: tuple[LayerShape, ...] = LLAMA_7B_SHAPES + LLAMA_13B_SHAPES + LLAMA_70B_SHAPES
# M values that cross every launcher threshold: 1, 16, 32 (decode tiles), 64 / 65 (the fused one-launch forward and
# the cuBLAS switch), 512 (few split-M weight-gradient splits), 2048 and 8192 (prefill / training).
SWEEP_M: tuple[int, ...] = (1, 16, 32, 64, 65, 512, 2048, 8192)
SWEEP_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128, 256)  # allocated ranks r (the fused decode path stops at 128)
KERNEL_DTYPE_NAMES: tuple[str, ...] = ("float16", "bfloat16", "float32")  # names, so this module needs no torch
DROPOUT_P = 0.1  # any p > 0 selects the same kernels; the benchmarks' dropout rows use it too


class LoRAFlags(NamedTuple):
    """The options that select different kernel specialisations of one LoRA / DoRA problem."""

    dropout: bool = False
    rank_scale: bool = False  # DyLoRA / AdaLoRA's per-rank vector v
    bias: bool = False
    frozen: bool = False  # gradients only for ranks [b // 2, b) (DyLoRA's frozen lower ranks)

    @property
    def id(self) -> str:
        on = [name for name, value in zip(self._fields, self, strict=True) if value]
        return "+".join(on) if on else "plain"


def lora_flag_sets(dora: bool = False) -> tuple[LoRAFlags, ...]:
    """Every combination of the flags (DoRA has no rank scale)."""
    sets = []
    for dropout in (False, True):
        for rank_scale in (False,) if dora else (False, True):
            for bias in (False, True):
                for frozen in (False, True):
                    sets.append(LoRAFlags(dropout, rank_scale, bias, frozen))
    return tuple(sets)


# Multi-adapter serving: rows per batch, pool ranks and adapter counts (the kernels' grid depends only on M, the
# pool's capacity and its rank, never on which adapter a row uses, so mixes select no other specialisation).
MULTI_M: tuple[int, ...] = (1, 16, 64, 512, 2048)
MULTI_RANKS: tuple[int, ...] = (16, 64)
ADAPTER_COUNTS: tuple[int, ...] = (1, 8, 32, 128)
MULTI_SWEEP_RANKS: tuple[int, ...] = (8, 16, 64, 128)


# ---- small shapes for CPU tests (Triton's interpreter) and odd sizes ------------------------------------------

INTERPRET_M: tuple[int, ...] = (1, 7, 63)  # one row, a partial tile, one short of a full 64-row tile
INTERPRET_KN: tuple[tuple[int, int], ...] = ((70, 33), (37, 50))  # (K, N), neither a multiple of 16
INTERPRET_RANKS: tuple[tuple[int, int], ...] = ((1, 1), (8, 5), (16, 16), (64, 37))  # (r, b): b < r and b = r
# Realistic sizes for GPU-marked tests: Llama K/N, an M that leaves a partial tile at prefill sizes.
GPU_TEST_M: tuple[int, ...] = (1, 63, 2049)


def interpret_cases() -> Iterator[LoRACase]:
    """Small odd-sized cases cheap enough for the Triton interpreter on CPU."""
    for M in INTERPRET_M:
        for K, N in INTERPRET_KN:
            for r, b in INTERPRET_RANKS:
                yield LoRACase(M, K, N, r, b)


# ---- ids ------------------------------------------------------------------------------------------------------

_DTYPE_IDS = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_id(dtype) -> str:
    """``torch.bfloat16`` (or ``"bfloat16"``) -> ``"bf16"``; works without importing torch here."""
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_IDS.get(name, name)


def case_id(M: int, K: int, N: int, r: int, b: int, dtype=None) -> str:
    """Readable pytest id, e.g. ``"M63-K70-N33-r8-b5-bf16"``."""
    base = f"M{M}-K{K}-N{N}-r{r}-b{b}"
    return base if dtype is None else f"{base}-{dtype_id(dtype)}"


# ---- physical floors (H100: ~3.0 TB/s HBM and ~800 TFLOP/s bf16 dense, both measured) ------------------------

H100_HBM_BYTES_PER_S = 3.0e12
H100_BF16_FLOPS_PER_S = 800e12


def base_bytes(M: int, K: int, N: int, elem_bytes: int = 2) -> int:
    """Bytes the base op ``x W0^T`` must move at least: read W0 and x, write y."""
    return elem_bytes * (N * K + M * K + M * N)


def adapter_bytes(K: int, N: int, b: int, elem_bytes: int = 2) -> int:
    """Extra bytes of a fused adapter at active rank b: read ``A[:b]`` and ``B[:, :b]``."""
    return elem_bytes * b * (N + K)


def floor_us(
    M: int,
    K: int,
    N: int,
    b: int = 0,
    *,
    bytes_per_s: float = H100_HBM_BYTES_PER_S,
    flops_per_s: float = H100_BF16_FLOPS_PER_S,
    elem_bytes: int = 2,
) -> float:
    """Roofline time (µs) of one forward ``x W0^T (+ s (x A^T) B^T at rank b)``: max(bytes / BW, flops / peak).

    b = 0 is the bare base op. E.g. 4096x4096: 11.2 µs at M=1, 86 µs at M=2048, 344 µs at M=8192.
    """
    n_bytes = base_bytes(M, K, N, elem_bytes) + adapter_bytes(K, N, b, elem_bytes)
    flops = 2 * M * N * K + 2 * M * b * (N + K)
    return max(n_bytes / bytes_per_s, flops / flops_per_s) * 1e6
