"""Triton helpers shared by every op's kernels: the dropout hash, the grouped program order, tile rules.

Imported only by ``ops/*/triton.py`` (importing the package never needs Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Hopper allows 227 KB of shared memory per block (A100: 163 KB); leave room for the epilogue's layout conversions.
SHARED_MEMORY_BUDGET = 160 * 1024


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finaliser: a bijection with full avalanche (``ops/lora/naive.py`` computes the same)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(seed, p_drop, o_m, o_k, n_cols):
    """[len(o_m), len(o_k)] booleans: does dropout keep x at (row o_m, column o_k) of an n_cols-wide x?

    A hash of (seed, m * n_cols + k), bit-identical to ``ops.lora.naive.dropout_mask``, so every backend, the
    forward and the backward draw the same mask whatever the Triton version. Kernels zero the dropped inputs (exact
    in any dtype) and apply 1/(1-p) to the fp32 accumulator, so a float16 x is never rounded twice.
    """
    o_flat = o_m[:, None] * n_cols + o_k[None, :]
    b_lo = o_flat.to(tl.uint32)
    b_hi = (o_flat >> 32).to(tl.uint32)
    b_key = fmix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    b_hash = fmix32(fmix32(b_lo ^ b_key) ^ b_hi)
    b_uniform = (b_hash >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 random bits: exact in float32
    return b_uniform >= p_drop


@triton.jit
def grouped_program(pid, num_rows, num_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr):
    """(row block, column block) of program ``pid`` over a [num_rows, num_cols] output, GROUP row blocks at a time,
    so the programs running together share their column operand's tiles in L2."""
    num_pid_m = tl.cdiv(num_rows, BLOCK_ROWS)
    num_pid_n = tl.cdiv(num_cols, BLOCK_COLS)
    num_pid_in_group = GROUP * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP
    group_size_m = min(num_pid_m - first_pid_m, GROUP)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def traceable(kernel):
    """``kernel`` as a launch ``torch.compile`` sees and schedules (``wrap_triton``) while compiling; as it is in eager
    mode (the wrapper's dispatch costs ~100 us a call) and under the interpreter (its kernels cannot be traced)."""
    if torch.compiler.is_compiling() and isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def kernels_compiled() -> bool:
    """The kernels are compiled ``JITFunction``s, not ``TRITON_INTERPRET=1``'s interpreted functions."""
    return isinstance(fmix32, JITFunction)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host arithmetic (``triton.cdiv`` is a constexpr function: ~3 us a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), as ``triton.next_power_of_2``, without its call overhead."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get true fp32 products, as torch's F.linear gives by default (tf32 would be 3e-4 off)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rank_block(rank: int) -> int:
    """Rank tile: tl.dot needs >= 16; 64 keeps a [BLOCK_M, BLOCK_R] fp32 accumulator in registers."""
    return min(64, max(16, next_power_of_2(rank)))


def pipeline_stages(rows_per_stage: int, block_k: int, itemsize: int, most: int = 4) -> int:
    """The most stages (<= ``most``) whose tiles, ``rows_per_stage`` rows of ``block_k`` elements, fit the budget."""
    return max(1, min(most, SHARED_MEMORY_BUDGET // (rows_per_stage * block_k * itemsize)))


def row_splits(M: int, tiles: int, block_m: int, min_rows: int = 256, programs: int = 264) -> tuple[int, int]:
    """(splits, rows per split) of a deterministic split-M reduction over ``tiles`` output tiles: enough splits for
    ~2 programs per SM on a 132-SM H100 (``programs``), at least ``min_rows`` rows each, a whole ``block_m`` apart."""
    splits = max(1, min(cdiv(programs, tiles), cdiv(M, min_rows)))
    rows_per_split = cdiv(cdiv(max(M, 1), splits), block_m) * block_m
    return cdiv(max(M, 1), rows_per_split), rows_per_split
