"""The one shape registry that tests and benchmarks share: model layer shapes, token counts, ranks.

Plain data and tiny helpers: this module itself needs only the standard library (the package's ``__init__``
imports torch), so reports and scripts can read it anywhere.

Conventions (DESIGN.md §2): a layer is ``nn.Linear(K, N)``: ``x [M, K] -> y [M, N]``, ``W0 [N, K]``;
``r`` is the allocated rank (``lora_A [r, K]``, ``lora_B [N, r]``), ``b <= r`` the active (DyLoRA) rank.
Numbers quoted here come from ../shared/BENCH.md.
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


# ---- Llama-7B (the benchmark shapes of BENCH.md) --------------------------------------------------------------

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
DECODE_MAX_M = max(DECODE_M)  # M at or below this is "decode": BENCH.md's goals and graph timing split here


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


# ---- physical floors (BENCH.md: H100 ~3.0 TB/s HBM and ~800 TFLOP/s bf16 dense, both measured) ----------------

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

    b = 0 is the bare base op. E.g. 4096x4096: 11.2 µs at M=1, 86 µs at M=2048, 344 µs at M=8192 (BENCH.md).
    """
    n_bytes = base_bytes(M, K, N, elem_bytes) + adapter_bytes(K, N, b, elem_bytes)
    flops = 2 * M * N * K + 2 * M * b * (N + K)
    return max(n_bytes / bytes_per_s, flops / flops_per_s) * 1e6
