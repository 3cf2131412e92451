"""torch.compile sees the ops' Triton launches: ``scripts/compile_visibility.py`` in a fresh process.

The suite runs under the interpreter, whose kernels cannot be traced; the script imports Triton with compiled
kernels (no GPU needed: graphs are captured, never run), checks that the LoRA, DoRA and multi-LoRA graphs hold their
kernels as ``triton_kernel_wrapper_functional`` nodes (forward and backward, one graph for every dropout seed) and
that a torch-backend call stays one opaque node. ``.ci/run`` runs it on Triton 3.6 too.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_visibility.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_compile_sees_every_triton_launch():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.strip().endswith("ok")
    for case in ("lora decode (one launch)", "lora decode, dropout, 3 seeds", "dora decode", "multi-LoRA serving"):
        assert case in run.stdout
