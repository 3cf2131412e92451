#!/usr/bin/env python3
"""Ahead-of-time compile check of every Triton kernel the launchers really launch, for sm_80 and sm_90, on a CPU.

    python scripts/aot_check.py --subset            # CI: one representative per coarse class (a few minutes)
    python scripts/aot_check.py --out sweep.md      # the whole sweep, its summary table also written to a file
    python scripts/aot_check.py --results r.jsonl --time-limit 3600 --out sweep.md   # in pieces: resumable

The whole sweep is ~3,000 specialisations x 2 targets, hours on 2 cores: ``--results`` keeps every compile's
result in a JSON-lines file (keyed by specialisation, kernel code, target and Triton version) and a later run
compiles only what is missing; ``--time-limit`` starts no new compile past its seconds and the report counts what it
did not reach. Compiles go in ``compile_order``: the subset's representatives, every other 16-bit specialisation,
then float32 (the report-only ones, whose spilling tiles are the slowest for ptxas).

How it works:

1. **Enumerate** (``enumerate_launches``): the ops' own orchestration (``lora_forward`` / ``lora_backward``,
   ``dora_forward`` / ``dora_backward``, ``row_norm``, ``multi_lora_forward``) runs on the Triton primitives over
   the shape registry ``lowrank_kernels.shapes`` (model layer shapes, M, ranks, dtypes, flags, adapter counts) with
   tensors on torch's ``meta`` device: shapes, strides and dtypes are real, no memory is touched, torch's own ops
   (cuBLAS' stand-in ``F.linear``, ``sum``) cost nothing. ``kernel[grid](...)`` is intercepted (``LaunchRecorder``,
   on both ``JITFunction`` and the interpreter's ``InterpretedFunction``): it records the kernel, its arguments
   specialised exactly as Triton's launcher would (``native_specialize_impl``: pointer alignment, integers equal to
   1 or divisible by 16), the constexprs, grid, num_warps and num_stages, and returns without running anything.
   Outputs stay unwritten; no launcher reads one back.
2. **Dedup** into distinct specialisations (kernel, signature, attributes, constexprs, options).
3. **Compile** each for ``GPUTarget("cuda", 80 | 90, 32)`` with ``triton.compile(ASTSource(...))`` (no GPU needed)
   and read the cubin with ``cuobjdump --dump-resource-usage`` and ``cuobjdump -sass`` (Triton's bundled copy first,
   then PATH, then /usr/local/cuda/bin): registers, local memory, spill stores/loads (STL/LDL instructions),
   shared memory (Triton's dynamic shared memory), and the MMA family: HGMMA (wgmma, sm_90), HMMA (mma.sync) or
   FFMA only (no tensor cores).

Rules (exit status 1 if any is broken):

- every specialisation compiles for both targets;
- shared memory per block within the opt-in limit: sm_80 166912 B (163 KB), sm_90 232448 B (227 KB);
- no register spill (no STL/LDL, no local memory) in a 16-bit specialisation (fp16 / bf16 inputs), but for the
  bounded, printed exceptions of ``SPILL_ALLOWANCE`` (one kernel, with the reason);
- every ``tl.dot`` on 16-bit operands runs on tensor cores (HMMA or HGMMA in the SASS).

float32 specialisations report their spills without failing: they run exact fp32 products (``input_precision=
"ieee"``, FFMA), a correctness path that is never the fast one, and their tiles are not worth a second register
budget. Per kernel the report prints grid sizes at the registry's shapes and waves on 132 SMs (an H100/H200): the
programs divided by what 132 SMs hold at once at that kernel's registers, shared memory and warps.

Importable: ``enumerate_launches``, ``distinct_specs``, ``coarse_subset``, ``compile_spec``, ``check``.
Compiling needs ``TRITON_INTERPRET`` off (``main`` switches it off before Triton is imported); enumerating works in
either mode, so the tests (which run under the interpreter) can call it in-process.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # compiling needs real JITFunctions; set before Triton is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from lowrank_kernels import shapes  # noqa: E402

SM_COUNT = 132  # H100 SXM / H200
SHARED_LIMIT = {80: 166912, 90: 232448}  # per-block opt-in maximum, bytes
REGISTERS_PER_SM = 65536
SHARED_PER_SM = {80: 167936, 90: 233472}
MAX_WARPS_PER_SM = {80: 64, 90: 64}
ARCHS = (80, 90)
SIXTEEN_BIT = ("fp16", "bf16")
# Known 16-bit spills the check reports (as ALLOWED, never silently) instead of failing, each with its bound in STL
# instructions: a regression past the bound fails. dora_norm_kernel spills a few values at 64-128 registers, far
# from any register limit, in some specialisations and not others of the same tiles, differently on Triton 3.6 and
# 3.9: no tile choice removed it (docs/GPU_NOTES.md); it needs a change of the kernel, not of its tiles. It runs
# once per weight update (the norm is cached), not per token.
SPILL_ALLOWANCE = {"dora_norm_kernel": 12}
SEED = 1234
SCALE = 2.0


# ---------------------------------------------------------------------------------------------------------------
# 1. Enumeration: intercept kernel[grid](...) while the ops' launch code runs on meta tensors
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """One distinct specialisation: what ``triton.compile`` needs, and every launch (case, grid) that selected it."""

    kernel: object  # the JITFunction / InterpretedFunction
    name: str
    signature: dict  # {arg name: "*bf16" | "i32" | "fp32" | "constexpr" ...}
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]]}
    num_warps: int
    num_stages: int
    launches: list = field(default_factory=list)  # [(case id, (grid x, y, z))]
    key: tuple = ()  # the recorder's dedup key (what Triton compiles), for the results cache

    def __getstate__(self) -> dict:
        """Picklable (the enumeration cache): the kernel by module and name, looked up again on loading."""
        state = dict(self.__dict__)
        state["kernel"] = (self.kernel.fn.__module__, self.kernel.fn.__name__)
        return state

    def __setstate__(self, state: dict) -> None:
        import importlib

        module, name = state["kernel"]
        self.__dict__.update(state, kernel=getattr(importlib.import_module(module), name))

    @property
    def dtype(self) -> str:
        """fp16 / bf16 when any pointer argument holds them (x, W, the adapters; t and outputs may be float32),
        else fp32: what "a 16-bit specialisation" means in the rules."""
        pointers = [t[1:] for t in self.signature.values() if t.startswith("*")]
        return next((t for t in pointers if t in SIXTEEN_BIT), "fp32")

    def constexpr_items(self) -> list[tuple[str, object]]:
        names = list(self.signature)
        return [(names[i[0]], v) for i, v in sorted(self.constexprs.items()) if not names[i[0]].endswith("_ptr")]

    @property
    def config(self) -> str:
        """The constexprs that are flags or tiles (not the runtime integers Triton turned into constants), options."""
        items = [f"{k}={v}" for k, v in self.constexpr_items() if k.isupper()]
        return " ".join(items + [f"w{self.num_warps}", f"s{self.num_stages}"])

    @property
    def coarse_class(self) -> tuple:
        """(kernel, 16-bit or not, tile shape, the flags that change the main loop, warps, stages): the subset
        compiles one specialisation of each, its heaviest (``weight``)."""
        main_loop = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "FUSE_SHRINK", "DROPPED_X", "HAS_DROPOUT")
        tiles = tuple((k, v) for k, v in self.constexpr_items() if k in main_loop)
        return (self.name, self.dtype in SIXTEEN_BIT, tiles, self.num_warps, self.num_stages)

    @property
    def weight(self) -> tuple:
        """Register pressure, roughly: flags on, the rank tile, bf16 before fp16 (its conversions cost more)."""
        values = dict(self.constexpr_items())
        flags = sum(1 for v in values.values() if v is True)
        return (flags, values.get("BLOCK_R", 0), self.dtype == "bf16", len(self.launches))


def _launch_options(kwargs: dict) -> tuple[int, int]:
    return int(kwargs.pop("num_warps", 4)), int(kwargs.pop("num_stages", 3))


class LaunchRecorder:
    """Within ``with recorder:``, ``kernel[grid](*args, **kwargs)`` records a launch and returns None."""

    def __init__(self) -> None:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        self._specialize = native_specialize_impl
        self._backend = BaseBackend
        self.specs: dict[tuple, Spec] = {}
        self.case = "?"
        self.launch_count = 0
        self._params_cache: dict[int, list] = {}
        self._saved: list = []

    def _params(self, kernel) -> list:
        """[(name, is_constexpr, do_not_specialize, do_not_specialize_on_alignment)] of a kernel's arguments."""
        key = id(kernel)
        if key not in self._params_cache:
            params = getattr(kernel, "params", None)
            if params is None:  # the interpreter's InterpretedFunction: Triton's own parameter parsing on its fn
                from triton.runtime.jit import JITFunction

                kw = getattr(kernel, "kwargs", {})
                params = JITFunction(
                    kernel.fn,
                    do_not_specialize=kw.get("do_not_specialize"),
                    do_not_specialize_on_alignment=kw.get("do_not_specialize_on_alignment"),
                ).params
            self._params_cache[key] = [
                (p.name, p.is_constexpr, p.do_not_specialize, p.do_not_specialize_on_alignment) for p in params
            ]
        return self._params_cache[key]

    def _signature(self, kernel) -> inspect.Signature:
        key = ("signature", id(kernel))
        if key not in self._params_cache:
            self._params_cache[key] = inspect.signature(kernel.fn)
        return self._params_cache[key]

    def record(self, kernel, grid, args, kwargs) -> None:
        kwargs = dict(kwargs)
        num_warps, num_stages = _launch_options(kwargs)
        bound = self._signature(kernel).bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, is_constexpr, no_spec, no_align) in enumerate(self._params(kernel)):
            value = bound.arguments[name]
            if is_constexpr:
                signature[name], constexprs[(i,)] = "constexpr", value
                continue
            ty, spec = self._specialize(self._backend, value, False, not no_spec, not no_align)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[(i,)] = spec
            elif isinstance(spec, str) and spec:
                attrs[(i,)] = self._backend.parse_attr(spec)
        name = kernel.fn.__name__
        key = (
            name,
            tuple(signature.items()),
            tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in attrs.items())),
            num_warps,
            num_stages,
        )
        spec = self.specs.get(key)
        if spec is None:
            spec = self.specs[key] = Spec(kernel, name, signature, constexprs, attrs, num_warps, num_stages, key=key)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        spec.launches.append((self.case, grid))
        self.launch_count += 1

    def __enter__(self) -> LaunchRecorder:
        from triton.runtime.jit import JITFunction, KernelInterface

        classes = [KernelInterface, JITFunction]
        with contextlib.suppress(ImportError):
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        recorder = self

        def getitem(kernel, grid):
            return lambda *args, **kwargs: recorder.record(kernel, grid, args, kwargs)

        for cls in classes:
            self._saved.append((cls, cls.__dict__.get("__getitem__")))
            cls.__getitem__ = getitem
        return self

    def __exit__(self, *exc) -> None:
        for cls, original in reversed(self._saved):
            if original is None:
                delattr(cls, "__getitem__")
            else:
                cls.__getitem__ = original
        self._saved.clear()


def _meta(*size, dtype) -> torch.Tensor:
    return torch.empty(*size, device="meta", dtype=dtype)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def lora_case(shape, M, r, b, dtype, flags, gemm) -> Callable[[], None]:
    """LoRA forward + backward (dx, dA, dB, dv) of one registry case through the ops' orchestration."""

    def run() -> None:
        from lowrank_kernels.ops.lora import op
        from lowrank_kernels.ops.lora import triton as impl

        K, N = shape.K, shape.N
        x, w, dy = _meta(M, K, dtype=dtype), _meta(N, K, dtype=dtype), _meta(M, N, dtype=dtype)
        bias = _meta(N, dtype=dtype) if flags.bias else None
        a, bm = _meta(r, K, dtype=dtype), _meta(N, r, dtype=dtype)
        v = _meta(r, dtype=dtype) if flags.rank_scale else None
        p = shapes.DROPOUT_P if flags.dropout else 0.0
        with _env(impl.GEMM_ENV_VAR, gemm):
            _, xa = op.lora_forward(impl, x, w, bias, a, bm, v, scale=SCALE, rank=b, p_drop=p, seed=SEED)
            op.lora_backward(impl, dy, x, w, a, bm, v, xa, scale=SCALE, rank=b,
                             grad_rank_start=b // 2 if flags.frozen else 0, p_drop=p, seed=SEED,
                             needs_dx=True, needs_dAB=True)  # fmt: skip

    return run


def dora_case(shape, M, r, b, dtype, flags) -> Callable[[], None]:
    """DoRA forward (save z) + backward (dx, dA, dB, dm) and the row norm, cached ||W0||^2 or not."""

    def run() -> None:
        from lowrank_kernels.ops.dora import op
        from lowrank_kernels.ops.dora import triton as impl

        K, N = shape.K, shape.N
        x, w, dy = _meta(M, K, dtype=dtype), _meta(N, K, dtype=dtype), _meta(M, N, dtype=dtype)
        bias = _meta(N, dtype=dtype) if flags.bias else None
        a, bm = _meta(r, K, dtype=dtype), _meta(N, r, dtype=dtype)
        magnitude, norm = _meta(N, dtype=dtype), _meta(N, dtype=torch.float32)
        p = shapes.DROPOUT_P if flags.dropout else 0.0
        _, xa, z = op.dora_forward(impl, x, w, bias, a, bm, magnitude, norm, scale=SCALE, rank=b, p_drop=p,
                                   seed=SEED, save_z=True)  # fmt: skip
        op.dora_backward(impl, dy, x, w, a, bm, magnitude, norm, xa, z, scale=SCALE, rank=b,
                         grad_rank_start=b // 2 if flags.frozen else 0, p_drop=p, seed=SEED,
                         needs_dx=True, needs_dAB=True, needs_dm=True)  # fmt: skip
        impl.row_norm(w, a, bm, norm if flags.bias else None, scale=SCALE, rank=b)  # bias flag doubles as "cached"

    return run


def multi_lora_case(shape, M, n, r, dtype, flags: shapes.LoRAFlags, dora: bool) -> Callable[[], None]:
    """Multi-adapter forward + backward (dx, per-slot dA / dB, DoRA's dg) of M rows over an n-slot pool of rank r
    through the ops' orchestration: the batch's sizes depend on M and n only, never on which adapter a row uses."""

    def run() -> None:
        from lowrank_kernels.ops.multi_lora import op
        from lowrank_kernels.ops.multi_lora import triton as impl
        from lowrank_kernels.ops.multi_lora.batch import max_tiles, segment_block_m
        from lowrank_kernels.ops.multi_lora.naive import BatchTensors

        K, N = shape.K, shape.N
        i32, f32 = torch.int32, torch.float32
        rows = [_meta(M, dtype=i32), _meta(M, dtype=i32), _meta(M, dtype=f32), _meta(M, dtype=i32)]
        meta = BatchTensors(*rows, _meta(max_tiles(M, n), 4, dtype=i32), _meta(n, 2, dtype=i32), segment_block_m(M))
        x, w, dy = _meta(M, K, dtype=dtype), _meta(N, K, dtype=dtype), _meta(M, N, dtype=dtype)
        bias = _meta(N, dtype=dtype) if flags.bias else None
        a, b = _meta(n, r, K, dtype=dtype), _meta(n, N, r, dtype=dtype)
        g, dora_slots = _meta(n, N, dtype=f32), _meta(n, dtype=i32)
        p = shapes.DROPOUT_P if flags.dropout else 0.0
        _, xa, z = op.multi_lora_forward(impl, x, w, bias, a, b, g, dora_slots, meta, has_dora=dora, p_drop=p,
                                         seed=SEED, save_z=dora)  # fmt: skip
        op.multi_lora_backward(impl, dy, x, w, a, b, g, dora_slots, xa, z if z is not None else x.new_empty(0),
                               meta, has_dora=dora, p_drop=p, seed=SEED, needs_dx=True, needs_dAB=True,
                               needs_dg=dora)  # fmt: skip

    return run


# The subset's registry: one layer shape (all model shapes are multiples of 16, so they change grids, never what
# Triton specialises on), the M values where tiles change, and no flag set between none, dropout and all.
SUBSET_M = (1, 16, 32, 64, 65, 2048, 8192)  # 8192: the dropout shrink's 32-row tiles (M > 4224)
SUBSET_RANKS = (8, 16, 32, 64, 128, 256)  # 32: the fused decode's 64-row tiles at rank tile 32 (full sweep)
SUBSET_MULTI_M = (1, 64, 2048)


def _subset_flags(dora: bool) -> tuple[shapes.LoRAFlags, ...]:
    """None, dropout alone, and every flag on (DoRA has no rank scale)."""
    return (shapes.LoRAFlags(), shapes.LoRAFlags(dropout=True), shapes.LoRAFlags(True, not dora, True, True))


def dropout_mask_case(M, K) -> Callable[[], None]:
    """The dropout-mask kernel (tests and debugging only; float32 output)."""

    def run() -> None:
        from lowrank_kernels.ops.lora import triton as impl

        impl.dropout_mask(SEED, (M, K), shapes.DROPOUT_P, "meta")

    return run


def sweep_cases(subset: bool) -> Iterator[tuple[str, Callable[[], None]]]:
    """(case id, runner) over the registry (``SUBSET_*`` for the subset)."""
    model_shapes = shapes.LLAMA_7B_SHAPES[:1] if subset else shapes.MODEL_SHAPES
    Ms, ranks = (SUBSET_M, SUBSET_RANKS) if subset else (shapes.SWEEP_M, shapes.SWEEP_RANKS)
    lora_flags, dora_flags = shapes.lora_flag_sets(), shapes.lora_flag_sets(dora=True)
    if subset:
        lora_flags, dora_flags = _subset_flags(dora=False), _subset_flags(dora=True)
    dtypes = [getattr(torch, name) for name in shapes.KERNEL_DTYPE_NAMES]
    for shape, M, r, dtype in itertools.product(model_shapes, Ms, ranks, dtypes):
        dt = shapes.dtype_id(dtype)
        for b in shapes.active_ranks(r):
            for flags in lora_flags:
                for gemm in ("auto", "triton") if M > shapes.DECODE_MAX_M else ("auto",):
                    case = f"lora {shape.id} M{M} r{r} b{b} {dt} {flags.id} gemm={gemm}"
                    yield case, lora_case(shape, M, r, b, dtype, flags, gemm)
            for flags in dora_flags:
                yield f"dora {shape.id} M{M} r{r} b{b} {dt} {flags.id}", dora_case(shape, M, r, b, dtype, flags)
    yield "dropout mask", dropout_mask_case(64, model_shapes[0].K)
    multi_Ms = SUBSET_MULTI_M if subset else shapes.MULTI_M
    for shape, M, n, r, dtype in itertools.product(
        model_shapes, multi_Ms, shapes.ADAPTER_COUNTS, shapes.MULTI_SWEEP_RANKS, dtypes
    ):
        for flags in dora_flags:
            for dora in (False, True):
                case = f"multi {shape.id} M{M} n{n} r{r} {shapes.dtype_id(dtype)} {flags.id} dora={dora}"
                yield case, multi_lora_case(shape, M, n, r, dtype, flags, dora)


def enumerate_launches(subset: bool = True, cases=None, case_filter: str | None = None) -> LaunchRecorder:
    """Run every case's launch code under a ``LaunchRecorder``; returns it (``.specs``, ``.launch_count``).
    ``case_filter``: a regular expression the case ids must match (``re.search``)."""
    recorder = LaunchRecorder()
    with recorder:
        for case, run in cases if cases is not None else sweep_cases(subset):
            if case_filter and not re.search(case_filter, case):
                continue
            recorder.case = case
            run()
    return recorder


def _enumeration_key(subset: bool, case_filter: str | None) -> str:
    """What an enumeration depends on: the package's and this script's sources, the registry's arguments, the
    Triton and torch versions (Triton's specialisation rules)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(repr((subset, case_filter, triton.__version__, torch.__version__)).encode())
    for path in sorted((root / "lowrank_kernels").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    script = Path(__file__).read_text()
    digest.update(script[: script.index("\n# 2. Compile and read the cubin")].encode())  # the enumeration's part
    return digest.hexdigest()


def enumerate_cached(subset: bool, case_filter: str | None, cache: str | None) -> tuple[list[Spec], int]:
    """(distinct specs, launch count), from ``cache`` (a pickle) when it was written for the same sources,
    arguments and versions (``_enumeration_key``), else enumerated and written there."""
    import pickle

    key = _enumeration_key(subset, case_filter)
    if cache and Path(cache).exists():
        with contextlib.suppress(Exception), open(cache, "rb") as f:
            stored_key, specs, count = pickle.load(f)
            if stored_key == key:
                return specs, count
    recorder = enumerate_launches(subset, case_filter=case_filter)
    specs = distinct_specs(recorder)
    if cache:
        with open(cache, "wb") as f:
            pickle.dump((key, specs, recorder.launch_count), f, protocol=pickle.HIGHEST_PROTOCOL)
    return specs, recorder.launch_count


def distinct_specs(recorder: LaunchRecorder) -> list[Spec]:
    return sorted(recorder.specs.values(), key=lambda s: (s.name, s.dtype, s.config))


def coarse_subset(specs: list[Spec]) -> list[Spec]:
    """One 16-bit specialisation per coarse class (``Spec.coarse_class``), the heaviest of it (``Spec.weight``).

    fp32 ones are left to the full sweep: no rule fails them but a compile error, and the worst of their spills
    keep ptxas busy for a minute each."""
    best: dict[tuple, Spec] = {}
    for spec in specs:
        if spec.dtype not in SIXTEEN_BIT:
            continue
        if spec.coarse_class not in best or spec.weight > best[spec.coarse_class].weight:
            best[spec.coarse_class] = spec
    return sorted(best.values(), key=lambda s: (s.name, s.dtype, s.config))


# ---------------------------------------------------------------------------------------------------------------
# 2. Compile and read the cubin
# ---------------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    for candidate in (str(bundled), shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{name} not found (Triton's bundled bin/, PATH, /usr/local/cuda/bin)")


_DOT_OPERAND = re.compile(r"tt\.dot\b.*?:\s*tensor<[0-9x]+x(\w+)>")


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile one specialisation for sm_<arch>; registers, spills, shared memory, MMA family (or the error)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(arch=arch, error=None)
    start = time.perf_counter()
    try:
        source = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))  # fmt: skip
    except Exception as e:  # a compile error is a finding, not a crash of the check
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return result
    result["compile_s"] = time.perf_counter() - start
    result["shared"] = int(compiled.metadata.shared)
    result["dots16"] = sum(1 for m in _DOT_OPERAND.finditer(compiled.asm["ttir"]) if m.group(1) in ("f16", "bf16"))
    result["dots"] = len(_DOT_OPERAND.findall(compiled.asm["ttir"]))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = _tool("cuobjdump")
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    result["registers"] = int(fields.get("REG", 0))
    result["local"] = int(fields.get("LOCAL", 0))
    result["stack"] = int(fields.get("STACK", 0))
    result["spill_stores"] = len(re.findall(r"\bSTL(\.\w+)*\b", sass))
    result["spill_loads"] = len(re.findall(r"\bLDL(\.\w+)*\b", sass))
    counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "FFMA")}
    result["mma"] = "HGMMA" if counts["HGMMA"] else "HMMA" if counts["HMMA"] else "FFMA" if counts["FFMA"] else "-"
    return result


def occupancy(spec: Spec, result: dict) -> int:
    """Programs one SM holds at once at this kernel's registers, shared memory and warps (at least 1)."""
    arch = result["arch"]
    threads = 32 * spec.num_warps
    regs = max(1, -(-result["registers"] // 8) * 8) * threads  # registers go out 8 a thread at a time (per warp: 256)
    by_regs = REGISTERS_PER_SM // regs
    by_shared = SHARED_PER_SM[arch] // (result["shared"] + 1024) if result["shared"] else 32  # 1 KB reserved a block
    by_warps = MAX_WARPS_PER_SM[arch] // spec.num_warps
    return max(1, min(by_regs, by_shared, by_warps, 32))


def problems(spec: Spec, result: dict) -> list[str]:
    """The rules this compiled specialisation breaks (empty: it passes)."""
    if result["error"]:
        return [f"compile error: {result['error']}"]
    found = []
    if result["shared"] > SHARED_LIMIT[result["arch"]]:
        found.append(f"shared memory {result['shared']} B > {SHARED_LIMIT[result['arch']]} B")
    spilled = result["spill_stores"] or result["spill_loads"] or result["local"]
    allowed = result["spill_stores"] <= SPILL_ALLOWANCE.get(spec.name, -1) and not result["local"]
    if spilled and spec.dtype in SIXTEEN_BIT and not allowed:
        found.append(f"register spill ({result['spill_stores']} STL, {result['spill_loads']} LDL, "
                     f"{result['local']} B local)")  # fmt: skip
    if result["dots16"] and result["mma"] not in ("HMMA", "HGMMA"):
        found.append(f"{result['dots16']} 16-bit tl.dot without tensor cores ({result['mma']})")
    return found


def _compile_job(job: tuple[int, int]) -> tuple[int, int, dict]:
    index, arch = job
    return index, arch, compile_spec(_JOB_SPECS[index], arch)


_JOB_SPECS: list[Spec] = []


@functools.cache
def code_digest(kernel) -> str:
    """A kernel's code and, recursively, the JIT functions and module constants it names, as ``ast.dump`` without
    docstrings: a reformatted or re-commented kernel keeps its cached results, any change to what it computes does
    not (Triton's own ``cache_key`` hashes the source text)."""
    digest, seen, todo = hashlib.sha256(), set(), [kernel]
    while todo:
        fn = getattr(todo.pop(), "fn", None)
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) is not None:
                node.body = node.body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
        for name in sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}):
            value = fn.__globals__.get(name)
            if hasattr(value, "fn"):  # a JITFunction it calls
                todo.append(value)
            elif isinstance(value, int | float | bool | str):
                digest.update(f"{name}={value!r}".encode())
    return digest.hexdigest()


def result_key(spec: Spec, arch: int) -> str:
    """What a cached result stands for: the specialisation, the kernel's code (``code_digest``), the target and the
    Triton version. A changed kernel, tile or option is a new key; a changed comment, docstring or layout is not."""
    text = repr((spec.key, code_digest(spec.kernel), arch, triton.__version__))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_results(path: str | None) -> dict[str, dict]:
    if not path or not Path(path).exists():
        return {}
    cached = {}
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            cached[entry["key"]] = entry["result"]
    return cached


def compile_order(specs: list[Spec]) -> list[int]:
    """Spec indices, what the rules fail on first: the subset's representatives, then every other 16-bit
    specialisation, then float32 (reported only; its spilling tiles keep ptxas busy longest). Past the
    representatives the coarse classes take turns, each heaviest first (``Spec.weight``): a sweep stopped by its
    time limit has looked at every class about equally, and at the likeliest spills of each first."""
    first = {id(s) for s in coarse_subset(specs)}
    order = [i for i in range(len(specs)) if id(specs[i]) in first]
    for sixteen in (True, False):
        classes: dict[tuple, list[int]] = {}
        for i, spec in enumerate(specs):
            if id(spec) not in first and (spec.dtype in SIXTEEN_BIT) == sixteen:
                classes.setdefault(spec.coarse_class, []).append(i)
        turns = [sorted(v, key=lambda i: specs[i].weight, reverse=True) for _, v in sorted(classes.items(), key=repr)]
        for rank in range(max(map(len, turns), default=0)):
            order += [queue[rank] for queue in turns if rank < len(queue)]
    return order


def compile_all(specs: list[Spec], archs=ARCHS, workers: int | None = None, results_file: str | None = None,
                time_limit: float | None = None) -> dict[tuple[int, int], dict]:  # fmt: skip
    """{(spec index, arch): result}, compiled in ``workers`` forked processes, in ``compile_order``.

    ``results_file``: a JSON-lines cache of results (``result_key``); what it holds is not compiled again and every
    new result is appended as it comes, so a sweep stopped anywhere resumes where it stopped. ``time_limit``:
    seconds after which no new compile starts (the results so far are returned; the report counts what is missing).
    Progress goes to stderr."""
    import concurrent.futures
    import multiprocessing

    global _JOB_SPECS
    _JOB_SPECS = specs
    cached = _load_results(results_file)
    results, jobs = {}, []
    for i in compile_order(specs):
        for arch in archs:
            hit = cached.get(result_key(specs[i], arch))
            if hit is not None:
                results[(i, arch)] = hit
            else:
                jobs.append((i, arch))
    total, reused, start = len(specs) * len(archs), len(results), time.perf_counter()
    sink = open(results_file, "a") if results_file else None  # noqa: SIM115 (closed below)
    last_note = [start]

    def done(i: int, arch: int, res: dict) -> None:
        results[(i, arch)] = res
        if sink and not res["error"]:  # an error is not kept: it may be the environment's (a tool being reinstalled)
            sink.write(json.dumps(dict(key=result_key(specs[i], arch), result=res)) + "\n")
            sink.flush()
        now = time.perf_counter()
        if now - last_note[0] > 60 or len(results) == total:
            last_note[0] = now
            new = len(results) - reused
            rate = new / (now - start)
            eta = (total - len(results)) / rate if rate else float("inf")
            print(f"[{len(results)}/{total} compiles, {reused} from {results_file}, {now - start:.0f} s, "
                  f"{rate * 3600:.0f} an hour, {eta / 60:.0f} min to go]", file=sys.stderr, flush=True)  # fmt: skip

    def in_time() -> bool:
        return time_limit is None or time.perf_counter() - start < time_limit

    workers = workers or os.cpu_count() or 1
    try:
        if workers == 1:
            for job in jobs:
                if not in_time():
                    break
                done(*_compile_job(job))
            return results
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending, queue = set(), iter(jobs)
            while True:
                while len(pending) < 2 * workers and in_time():
                    job = next(queue, None)
                    if job is None:
                        break
                    pending.add(pool.submit(_compile_job, job))
                if not pending:
                    break
                finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    done(*future.result())
        return results
    finally:
        if sink:
            sink.close()


# ---------------------------------------------------------------------------------------------------------------
# 3. Report
# ---------------------------------------------------------------------------------------------------------------


def _grid_summary(spec: Spec, results: dict) -> str:
    """Programs per launch (min-max over the registry's cases) and waves on 132 SMs at the sm_90 occupancy."""
    programs = sorted({gx * gy * gz for _, (gx, gy, gz) in spec.launches})
    res90 = results.get(90)
    per_wave = SM_COUNT * occupancy(spec, res90) if res90 and not res90["error"] else SM_COUNT
    lo, hi = programs[0], programs[-1]
    span = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"{span} ({lo / per_wave:.2g}-{hi / per_wave:.2g} waves)"


def report(specs: list[Spec], results: dict, archs=ARCHS) -> tuple[str, list[str]]:
    """(markdown table, failures): a row per compiled specialisation, both targets side by side."""
    head = "| kernel | dtype | config | " + " | ".join(
        f"sm_{a} regs | sm_{a} spill st/ld | sm_{a} smem | sm_{a} mma" for a in archs
    )
    lines = [head + " | programs (waves on 132 SMs) | launches |", "|" + "---|" * (3 + 4 * len(archs) + 2)]
    failures = []
    for i, spec in enumerate(specs):
        per_arch = {a: results[(i, a)] for a in archs if (i, a) in results}
        if not per_arch:
            continue
        cells = []
        for a in archs:
            res = per_arch.get(a)
            if res is None:
                cells += ["not compiled", "", "", ""]
            elif res["error"]:
                cells += ["ERROR", "", "", ""]
            else:
                cells += [str(res["registers"]), f"{res['spill_stores']}/{res['spill_loads']}", str(res["shared"]),
                          res["mma"]]  # fmt: skip
            if res is not None:
                failures += [f"{spec.name} {spec.dtype} {spec.config} sm_{a}: {p}" for p in problems(spec, res)]
        lines.append(f"| {spec.name} | {spec.dtype} | {spec.config} | " + " | ".join(cells)
                     + f" | {_grid_summary(spec, per_arch)} | {len(spec.launches)} |")  # fmt: skip
    return "\n".join(lines), failures


def _span(values) -> str:
    values = sorted(set(values))
    if not values:
        return "-"
    return f"{values[0]}" if len(values) == 1 else f"{values[0]}-{values[-1]}"


def kernel_table(specs: list[Spec], results: dict, archs=ARCHS) -> str:
    """A row per kernel and dtype class (16-bit, fp32) over its compiled specialisations: registers, spill
    compiles (worst STL), shared memory, the sm_90 MMA families, and the waves on 132 SMs over its launches."""
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault((spec.name, "16-bit" if spec.dtype in SIXTEEN_BIT else "fp32"), []).append(i)
    head = "| kernel | dtype | specs compiled | " + " | ".join(f"sm_{a} regs" for a in archs)
    lines = [head + " | spill compiles (max STL) | smem (B) | sm_90 mma | waves |", "|" + "---|" * (7 + len(archs))]
    for (name, kind), indices in sorted(groups.items()):
        done = [(i, a, results[(i, a)]) for i in indices for a in archs if (i, a) in results]
        ok = [(i, a, r) for i, a, r in done if not r["error"]]
        compiled = len({i for i, _, _ in done})
        regs = [_span(r["registers"] for _, b, r in ok if b == a) for a in archs]
        spilled = [r for _, _, r in ok if r["spill_stores"] or r["spill_loads"]]
        spills = f"{len(spilled)} ({max(r['spill_stores'] for r in spilled)})" if spilled else "0"
        mma: dict[str, int] = {}
        for _, a, r in ok:
            if a == 90 and r["dots"]:
                mma[r["mma"]] = mma.get(r["mma"], 0) + 1
        waves = []
        for i, a, r in ok:
            if a == 90:
                per_wave = SM_COUNT * occupancy(specs[i], r)
                waves += [gx * gy * gz / per_wave for _, (gx, gy, gz) in specs[i].launches]
        wave_span = f"{min(waves):.2g}-{max(waves):.2g}" if waves else "-"
        errors = len(done) - len(ok)
        lines.append(f"| {name} | {kind} | {compiled} / {len(indices)}" + (f" ({errors} errors)" if errors else "")
                     + " | " + " | ".join(regs) + f" | {spills} | {_span(r['shared'] for _, _, r in ok)} | "
                     + (", ".join(f"{k} {v}" for k, v in sorted(mma.items())) or "no dot")
                     + f" | {wave_span} |")  # fmt: skip
    return "\n".join(lines)


def summarise(chosen: list[Spec], results: dict, archs, failures: list[str], seconds: float) -> str:
    """The sweep's numbers in one paragraph (what the rules count, over the compiled specialisations)."""
    ok = {k: r for k, r in results.items() if not r["error"]}
    sixteen = {k: r for k, r in ok.items() if chosen[k[0]].dtype in SIXTEEN_BIT}
    spilled16 = [k for k, r in sixteen.items() if r["spill_stores"] or r["spill_loads"] or r["local"]]
    allowed16 = [k for k in spilled16 if not problems(chosen[k[0]], ok[k])]
    spilled32 = [k for k, r in ok.items() if k not in sixteen and (r["spill_stores"] or r["spill_loads"])]
    shared = [k for k, r in ok.items() if r["shared"] > SHARED_LIMIT[r["arch"]]]
    no_tc = [k for k, r in ok.items() if r["dots16"] and r["mma"] not in ("HMMA", "HGMMA")]
    families: dict[str, int] = {}
    for (_, a), r in ok.items():
        if a == 90 and r["dots"]:
            families[r["mma"]] = families.get(r["mma"], 0) + 1
    compiled = len({i for i, _ in results})
    complete = len({i for i in range(len(chosen)) if all((i, a) in results for a in archs)})
    n16 = sum(1 for s in chosen if s.dtype in SIXTEEN_BIT)
    missing = len(chosen) * len(archs) - len(results)
    return (f"triton {triton.__version__}, torch {torch.__version__}: {len(chosen)} specialisations ({n16} 16-bit) x "
            f"{len(archs)} targets; compiled {len(results)} of {len(chosen) * len(archs)} "
            f"({complete} specialisations on every target, {compiled} on at least one"
            + (f"; {missing} compiles not reached" if missing else "") + "); "
            f"{len(results) - len(ok)} compile errors, {len(shared)} over the shared-memory limit, "
            f"{len(spilled16)} 16-bit compiles with spills ({len(allowed16)} allowed by SPILL_ALLOWANCE), "
            f"{len(no_tc)} with 16-bit dots off the tensor cores, {len(spilled32)} fp32 compiles with spills "
            f"(reported only); sm_90 compiles with dots: "
            + (", ".join(f"{k} {v}" for k, v in sorted(families.items())) or "none")
            + f"; {len(failures)} failures; {seconds:.0f} s")  # fmt: skip


def check(subset: bool = True, archs=ARCHS, workers: int | None = None, out: str | None = None,
          cases: str | None = None, only: str | None = None, results_file: str | None = None,
          time_limit: float | None = None, enumeration_cache: str | None = None) -> int:  # fmt: skip
    """Enumerate, compile, report; 0 when every rule holds, 1 otherwise. ``cases`` / ``only``: regular expressions
    on the case ids / on ``"kernel dtype config"`` of the specialisations (to look at a few). ``results_file`` /
    ``time_limit``: see ``compile_all``; a sweep cut short by its time limit also exits 1 (it checked less).
    ``enumeration_cache``: see ``enumerate_cached``."""
    start = time.perf_counter()
    specs, launch_count = enumerate_cached(subset, cases, enumeration_cache)
    chosen = coarse_subset(specs) if subset else specs
    if only:
        chosen = [s for s in chosen if re.search(only, f"{s.name} {s.dtype} {s.config}")]
    enumerated = time.perf_counter() - start
    print(f"triton {triton.__version__}, torch {torch.__version__}: {launch_count} launches, "
          f"{len(specs)} distinct specialisations, {len(chosen)} to compile for "
          f"{', '.join(f'sm_{a}' for a in archs)} ({'subset' if subset else 'full sweep'}; "
          f"enumerated in {enumerated:.1f} s)", flush=True)  # fmt: skip
    remaining = None if time_limit is None else max(0.0, time_limit - enumerated)
    results = compile_all(chosen, archs, workers, results_file, remaining)
    table, failures = report(chosen, results, archs)
    summary = summarise(chosen, results, archs, failures, time.perf_counter() - start)
    kernels = kernel_table(chosen, results, archs)
    print(table)
    print()
    print(kernels)
    print()
    print(summary)
    allowed = [f"{chosen[i].name} {chosen[i].dtype} {chosen[i].config} sm_{a}: {r['spill_stores']} STL, "
               f"{r['spill_loads']} LDL (allowance {SPILL_ALLOWANCE[chosen[i].name]} STL)"
               for (i, a), r in results.items() if not r["error"] and chosen[i].name in SPILL_ALLOWANCE
               and chosen[i].dtype in SIXTEEN_BIT and r["spill_stores"]]  # fmt: skip
    for line in allowed:
        print("ALLOWED spill", line)
    for failure in failures:
        print("FAIL", failure)
    if out:
        Path(out).write_text(f"{summary}\n\n{kernels}\n\n{table}\n" + "".join(f"\nALLOWED spill {a}" for a in allowed)
                             + "".join(f"\nFAIL {f}" for f in failures) + "\n")  # fmt: skip
    return 1 if failures or len(results) < len(chosen) * len(archs) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="one specialisation per coarse class (CI)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="target(s); default both")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--out", default=None, help="also write the summary table to this file")
    parser.add_argument("--cases", default=None, help="regular expression the enumerated case ids must match")
    parser.add_argument("--only", default=None, help="regular expression on 'kernel dtype config' to compile")
    parser.add_argument("--results", default=None, help="JSON-lines cache of compile results: reused, appended to")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds (from the start) after which no new compile starts; the report says what is "
                             "missing")  # fmt: skip
    parser.add_argument("--enumeration-cache", default=None,
                        help="pickle of the enumeration, reused while sources and versions are the same")  # fmt: skip
    args = parser.parse_args(argv)
    return check(subset=args.subset, archs=tuple(args.arch or ARCHS), workers=args.workers, out=args.out,
                 cases=args.cases, only=args.only, results_file=args.results,
                 time_limit=args.time_limit, enumeration_cache=args.enumeration_cache)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
