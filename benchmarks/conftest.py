"""Benchmark setup: skip everything cleanly without a CUDA GPU, record the GPU and software versions, keep time.

Environment (all optional):
  LOWRANK_BENCH_QUICK=1       only the 4096x4096 shape (the full matrix is 3 Llama-7B shapes)
  LOWRANK_BENCH_BUDGET_S=N    skip (with that reason) every benchmark that would start after N seconds of the session,
                              so a run under a hard wall-clock limit still ends and writes its JSON
  LOWRANK_BENCH_JSONL=PATH    also append each result as one JSON line as soon as it is measured (survives a kill)
  LOWRANK_BENCH_WARMUP_MS / LOWRANK_BENCH_REP_MS   triton.testing.do_bench's warmup / rep (default 10 / 50)
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from lowrank_kernels.shapes import LLAMA_7B_SHAPES

BENCH_DIR = Path(__file__).parent.resolve()
_SESSION_START = time.monotonic()


def _skip_reason() -> str | None:
    """Why the benchmarks cannot run here, or None."""
    if importlib.util.find_spec("pytest_benchmark") is None:
        return "pytest-benchmark is not installed (pip install pytest-benchmark)"
    if not torch.cuda.is_available():
        cuda = torch.version.cuda or "none (CPU build)"
        return f"no CUDA GPU: the benchmarks time GPU kernels (torch {torch.__version__}, CUDA build {cuda})"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: the fused kernels and triton.testing.do_bench need it"
    return None


def _in_bench_dir(item) -> bool:
    return BENCH_DIR in Path(str(item.path)).resolve().parents


def _shape_position(item) -> int:
    case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
    shape = getattr(case, "shape", None)
    return LLAMA_7B_SHAPES.index(shape) if shape in LLAMA_7B_SHAPES else -1


def pytest_collection_modifyitems(config, items):
    # Shape-major across test functions (stable: each (op, shape, M) still starts with its baseline), so a run cut
    # short by LOWRANK_BENCH_BUDGET_S loses whole shapes at the end, not the b=8 vs b=64 rows of every shape.
    items.sort(key=lambda item: _shape_position(item) if _in_bench_dir(item) else -1)
    reason = _skip_reason()
    if reason is None:
        return
    mark = pytest.mark.skip(reason=reason)
    for item in items:
        if _in_bench_dir(item) and item.get_closest_marker("host") is None:  # host-overhead rows run on any machine
            item.add_marker(mark)


@functools.cache
def environment_info() -> dict:
    """GPU name and software versions, written next to every result (no figure without them)."""
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    for module in ("triton", "peft", "lowrank_kernels"):
        try:
            info[module] = getattr(__import__(module), "__version__", "?")
        except Exception:  # not installed, or broken: the versions line must never stop a run
            info[module] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=_driver_version(),
        )
    else:
        info["gpu"] = None
    return info


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["lowrank_kernels_env"] = environment_info()


@pytest.fixture(scope="session")
def bench_env() -> dict:
    return environment_info()


@pytest.fixture(autouse=True)
def _bench_time_budget():
    """Skip benchmarks that would start past LOWRANK_BENCH_BUDGET_S, so a time-limited run still writes its JSON."""
    budget = os.environ.get("LOWRANK_BENCH_BUDGET_S")
    if budget:
        elapsed = time.monotonic() - _SESSION_START
        if elapsed > float(budget):
            pytest.skip(f"time budget LOWRANK_BENCH_BUDGET_S={budget} s spent ({elapsed:.0f} s elapsed)")
    yield
