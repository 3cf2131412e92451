#!/usr/bin/env python3
"""Check, on a CPU, that ``torch.compile`` sees the Triton launches of the ops (they are ``triton_op`` s).

    python scripts/compile_visibility.py              # exit status 1 if a graph lacks a launch it should hold

The kernels are compiled (``TRITON_INTERPRET=0``), never run: the graphs are captured by AOTAutograd compilers that
return zeros of the traced shapes. Triton's analysis of which tensors a kernel writes needs a target, not a GPU; a
stand-in driver names sm_80. The Triton backend is asked for by name on CPU tensors (the interpreter check is
switched off, as nothing launches). Each case lists the kernels its forward and backward graphs must launch through
``triton_kernel_wrapper_functional``, and a torch-backend call must stay one opaque node. Run by
``tests/test_traceable_ops.py`` and, on the GPU image's Triton 3.6, by ``.ci/run``.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before Triton is imported: compiled JITFunctions, which wrap_triton traces
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import lowrank_kernels as lk  # noqa: E402
from lowrank_kernels import backend  # noqa: E402


class TargetOnlyDriver:
    """Enough of a Triton driver for torch's mutation analysis (it lowers kernels to TTIR for a target)."""

    def get_current_target(self):
        return GPUTarget("cuda", 80, 32)


def capture(graphs: list):
    def compiler(gm, _inputs):
        graphs.append(gm)
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]

        def run(*_args):  # zeros of the traced outputs: nothing launches, autograd still traces the backward
            vals = [o.meta.get("val") if o is not None else None for o in outputs]
            return [torch.zeros([_hint(d) for d in v.shape], dtype=v.dtype) if isinstance(v, torch.Tensor) else v
                    for v in vals]  # fmt: skip

        return run

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def _hint(size):
    """A symbolic size's value in the traced example (dynamic=True), a plain int as it is."""
    return size.node.hint if isinstance(size, torch.SymInt) else size


def launches(gm) -> Counter:
    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    return Counter(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                   for n in gm.graph.nodes if n.target is wrapper)  # fmt: skip


def opaque_ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "_opaque" in str(n.target)}


def compiled(fn, *args, calls=1, backward=True, dynamic=None):
    """The graphs of ``fn`` compiled with the capturing backend and called ``calls`` times (call index last)."""
    graphs: list = []
    torch._dynamo.reset()
    f = torch.compile(fn, backend=capture(graphs), fullgraph=True, dynamic=dynamic)
    for i in range(calls):
        out = f(*args, i)
        if backward:
            out.sum().backward()
    return graphs


def main() -> int:
    triton.runtime.driver.set_active(TargetOnlyDriver())
    backend.interpreter_active = lambda: True  # Triton on CPU tensors: nothing is launched
    torch.manual_seed(0)
    M, K, N, R = 8, 32, 48, 16
    x = torch.randn(M, K, requires_grad=True)
    W, bias = torch.randn(N, K) / 6, torch.randn(N)
    A, B = torch.randn(R, K, requires_grad=True), torch.randn(N, R, requires_grad=True)
    m = (torch.rand(N) + 0.5).requires_grad_()
    failures: list[str] = []

    def expect(case: str, graphs, fw: dict, bw: dict | None = None, max_graphs: int | None = None) -> None:
        found = [launches(g) for g in graphs]
        print(f"{case}: {len(graphs)} graphs; launches {[dict(c) for c in found]}")
        for want, got in ((fw, found[0] if found else Counter()), (bw, found[1] if len(found) > 1 else Counter())):
            for kernel, count in (want or {}).items():
                if got[kernel] < count:
                    failures.append(f"{case}: expected {count} x {kernel}, graph has {dict(got)}")
        if max_graphs is not None and len(graphs) > max_graphs:
            failures.append(f"{case}: {len(graphs)} graphs (recompiled; at most {max_graphs} expected)")

    lora_backward = {"lora_shrink_kernel": 1, "lora_matmul_kernel": 1, "lora_weight_grad_kernel": 2}
    with lk.use_backend("triton"):
        graphs = compiled(lambda x, A, B, i: lk.lora_linear(x, W, bias, A, B, scale=0.5), x, A, B)
        expect("lora decode (one launch)", graphs, {"lora_matmul_kernel": 1}, lora_backward)
        # Seeds drawn per call: one graph for all (the seed is a graph input, read by .item() inside it).
        graphs = compiled(lambda x, A, B, i: lk.lora_linear(x, W, bias, A, B, scale=0.5, dropout=0.1), x, A, B,
                          calls=3)  # fmt: skip
        expect("lora decode, dropout, 3 seeds", graphs, {"lora_matmul_kernel": 1}, lora_backward, max_graphs=2)
        x_prefill = torch.randn(96, K, requires_grad=True)
        graphs = compiled(lambda x, A, B, i: lk.lora_linear(x, W, bias, A, B, scale=0.5), x_prefill, A, B)
        expect("lora prefill (shrink, then the GEMM)", graphs, {"lora_shrink_kernel": 1},
               {"lora_shrink_kernel": 1, "lora_weight_grad_kernel": 2})  # fmt: skip
        # Symbolic sizes reach the launchers' host code (tile choice, grids) as SymInts.
        graphs = compiled(lambda x, A, B, i: lk.lora_linear(x, W, bias, A, B, scale=0.5), x_prefill, A, B,
                          dynamic=True)  # fmt: skip
        expect("lora prefill, dynamic shapes", graphs, {"lora_shrink_kernel": 1},
               {"lora_shrink_kernel": 1, "lora_weight_grad_kernel": 2})  # fmt: skip
        graphs = compiled(lambda x, A, B, i: lk.lora_linear(x, W, bias, A, B, scale=0.5), x, A, B, dynamic=True)
        expect("lora decode, dynamic shapes", graphs, {"lora_matmul_kernel": 1}, lora_backward)
        graphs = compiled(lambda x, A, B, i: lk.dora_linear(x, W, bias, A, B, m, scale=0.5), x, A, B)
        expect("dora decode", graphs, {"dora_norm_kernel": 1, "lora_matmul_kernel": 1},
               {"dora_dx_kernel": 1, "col_dot_kernel": 1, "lora_weight_grad_kernel": 2})  # fmt: skip
        graphs = compiled(lambda x, A, B, i: lk.dora_linear(x, W, bias, A, B, m, scale=0.5, dropout=0.1), x, A, B,
                          dynamic=True)  # fmt: skip
        expect("dora decode, dropout, dynamic shapes", graphs, {"dora_norm_kernel": 1},
               {"dora_dx_kernel": 1, "col_dot_kernel": 1, "lora_weight_grad_kernel": 2})  # fmt: skip

        layer = lk.MultiLoRALinear.from_linear(nn.Linear(K, N), capacity=3, max_rank=R).eval()
        layer.add_adapter("a", torch.randn(R, K) / 6, torch.randn(N, R) / 6, alpha=8.0)
        layer.add_adapter("b", torch.randn(4, K) / 6, torch.randn(N, 4) / 6, alpha=8.0)
        batch = lk.AdapterBatch.build(layer.pool, ["a", "b", None, "a"])
        with torch.no_grad():
            graphs = compiled(lambda x, _i: layer(x, batch), torch.randn(4, K), backward=False)
        expect("multi-LoRA serving", graphs, {"multi_lora_shrink_kernel": 1, "multi_lora_expand_kernel": 1})
        graphs = compiled(lambda x, _i: layer(x, batch), torch.randn(4, K), backward=False, dynamic=True)
        expect("multi-LoRA serving, dynamic shapes", graphs,
               {"multi_lora_shrink_kernel": 1, "multi_lora_expand_kernel": 1})  # fmt: skip

    with lk.use_backend("torch"):  # the reference stays one opaque custom op
        graphs = compiled(lambda x, A, B, i: lk.lora_linear(x, W, bias, A, B, scale=0.5), x, A, B)
        names = opaque_ops(graphs[0]) if graphs else set()
        print(f"lora on the torch backend: opaque ops {sorted(names)}")
        if not any("lora_fwd_opaque" in n for n in names):
            failures.append(f"lora on the torch backend: expected the opaque lora_fwd_opaque node, got {names}")

    print(f"torch {torch.__version__}, triton {triton.__version__}")
    for f in failures:
        print("FAIL", f)
    print("ok" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
