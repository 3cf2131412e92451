"""The ahead-of-time compile check (``scripts/aot_check.py``): its launch interception sees every kernel of every op,
records what the launchers choose without running anything, and one small compile reads a real cubin.

``.ci/run`` runs the check's subset for both Triton versions (3.6, the GPU image's, and the venv's); these tests keep
the enumeration honest under the interpreter the test suite runs in.
"""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402

from lowrank_kernels import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "aot_check.py"
_spec = importlib.util.spec_from_file_location("aot_check", SCRIPT)
aot_check = importlib.util.module_from_spec(_spec)
sys.modules["aot_check"] = aot_check  # dataclasses look their module up
_spec.loader.exec_module(aot_check)

LLAMA_ATTN = shapes.LLAMA_7B_SHAPES[0]  # 4096 x 4096


def _kernels_of(module) -> set[str]:
    """Names of the @triton.jit kernels a module defines (JITFunction, or InterpretedFunction under the interpreter)."""
    from triton.runtime.jit import KernelInterface

    return {
        name
        for name, obj in vars(module).items()
        if isinstance(obj, KernelInterface) and name.endswith("_kernel") and obj.fn.__module__ == module.__name__
    }


def _few_cases():
    """Decode and prefill, both GEMM strategies, dropout or not, DoRA, multi-adapter: every launcher branch."""
    import torch

    flags_all = shapes.LoRAFlags(dropout=True, rank_scale=True, bias=True, frozen=True)
    dora_all = shapes.LoRAFlags(dropout=True, bias=True, frozen=True)
    for M in (1, 2048):
        for gemm in ("auto", "triton"):
            for flags in (shapes.LoRAFlags(), flags_all):
                yield f"lora M{M} {gemm} {flags.id}", aot_check.lora_case(LLAMA_ATTN, M, 16, 16, torch.float16, flags,
                                                                          gemm)  # fmt: skip
        for flags in (shapes.LoRAFlags(), dora_all):
            yield f"dora M{M} {flags.id}", aot_check.dora_case(LLAMA_ATTN, M, 16, 16, torch.float16, flags)
        for flags in (shapes.LoRAFlags(), dora_all):
            for dora in (False, True):
                case = aot_check.multi_lora_case(LLAMA_ATTN, M, 8, 16, torch.float16, flags, dora)
                yield f"multi M{M} {flags.id} dora={dora}", case
    yield "dropout mask", aot_check.dropout_mask_case(64, 4096)


def test_interception_enumerates_every_kernel_of_every_op():
    from lowrank_kernels.ops.dora import triton as dora_triton
    from lowrank_kernels.ops.lora import triton as lora_triton
    from lowrank_kernels.ops.multi_lora import triton as multi_triton

    expected = _kernels_of(lora_triton) | _kernels_of(dora_triton) | _kernels_of(multi_triton)
    assert len(expected) >= 10  # the kernels exist under either decorator
    recorder = aot_check.enumerate_launches(cases=list(_few_cases()))
    assert {spec.name for spec in recorder.specs.values()} == expected
    assert recorder.launch_count > len(recorder.specs)  # same specialisations recur: the dedup works


def test_interception_records_the_launchers_choices_without_running():
    """The one-launch decode forward at M = 1, rank 16, on 4096 x 4096: one lora_matmul launch, 4096 / BLOCK_N
    programs, the shrink fused; M = 1 and the unit strides become constants exactly as Triton's launcher does."""
    import torch

    cases = [("decode", lambda: aot_check.lora_case(LLAMA_ATTN, 1, 16, 16, torch.float16, shapes.LoRAFlags(),
                                                    "auto")())]  # fmt: skip
    with aot_check.LaunchRecorder() as recorder:
        recorder.case = "decode"
        from lowrank_kernels.ops.lora import op
        from lowrank_kernels.ops.lora import triton as impl

        x = torch.empty(1, 4096, device="meta", dtype=torch.float16)
        w = torch.empty(4096, 4096, device="meta", dtype=torch.float16)
        a = torch.empty(16, 4096, device="meta", dtype=torch.float16)
        b = torch.empty(4096, 16, device="meta", dtype=torch.float16)
        y, xa = op.lora_forward(impl, x, w, None, a, b, None, scale=2.0, rank=16, p_drop=0.0, seed=3)
    assert y.device.type == "meta" and xa.shape == (1, 16)  # nothing ran: meta tensors hold no data
    (spec,) = recorder.specs.values()
    constexprs = dict(spec.constexpr_items())
    assert spec.name == "lora_matmul_kernel" and constexprs["FUSE_SHRINK"] is True
    assert constexprs["M"] == 1 and constexprs["stride_xk"] == 1  # integers equal to 1 are specialised
    assert spec.signature["x_ptr"] == "*fp16" and spec.signature["K"] == "i32"
    assert spec.signature["seed"] == "i32"  # do_not_specialize: never a constant
    ((_, grid),) = spec.launches
    assert grid == (4096 // constexprs["BLOCK_N"], 1, 1)
    # the sweep's runner of the same case (forward and backward) launches the same forward specialisation
    again = aot_check.enumerate_launches(cases=cases)
    assert set(recorder.specs) < set(again.specs)


def test_subset_keeps_one_16_bit_specialisation_per_coarse_class():
    recorder = aot_check.enumerate_launches(cases=list(_few_cases()))
    specs = aot_check.distinct_specs(recorder)
    subset = aot_check.coarse_subset(specs)
    classes = {s.coarse_class for s in specs if s.dtype in aot_check.SIXTEEN_BIT}
    assert len(subset) == len(classes) and {s.coarse_class for s in subset} == classes
    assert all(s.dtype in aot_check.SIXTEEN_BIT for s in subset)


def test_rules_fail_spills_shared_memory_and_missing_tensor_cores():
    recorder = aot_check.enumerate_launches(cases=list(_few_cases()))
    by_dtype = {s.dtype: s for s in recorder.specs.values() if s.name == "lora_shrink_kernel"}
    ok = dict(arch=90, error=None, shared=1024, spill_stores=0, spill_loads=0, local=0, dots16=1, mma="HGMMA")
    assert aot_check.problems(by_dtype["fp16"], ok) == []
    assert aot_check.problems(by_dtype["fp16"], {**ok, "spill_stores": 2})  # a 16-bit spill fails
    assert aot_check.problems(by_dtype["fp16"], {**ok, "shared": 232449})
    assert aot_check.problems(by_dtype["fp16"], {**ok, "arch": 80, "shared": 166913})
    assert aot_check.problems(by_dtype["fp16"], {**ok, "mma": "FFMA"})
    assert aot_check.problems(by_dtype["fp16"], {**ok, "error": "boom"})
    fp32_spill = {**ok, "spill_stores": 40, "spill_loads": 40, "dots16": 0, "mma": "FFMA"}
    fp32 = copy.copy(by_dtype["fp16"])
    fp32.signature = {k: v.replace("fp16", "fp32") for k, v in fp32.signature.items()}
    assert fp32.dtype == "fp32" and aot_check.problems(fp32, fp32_spill) == []  # fp32: reported, not failed
    norm = next(s for s in recorder.specs.values() if s.name == "dora_norm_kernel" and s.dtype == "fp16")
    bound = aot_check.SPILL_ALLOWANCE["dora_norm_kernel"]
    assert aot_check.problems(norm, {**ok, "spill_stores": bound}) == []
    assert aot_check.problems(norm, {**ok, "spill_stores": bound + 1})  # past its allowance it fails


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir(), reason="no NVIDIA backend")
def test_one_kernel_compiles_for_both_targets_and_reads_its_cubin():
    """A real compile (in a subprocess: the tests run under the interpreter) of the decode shrink: registers read
    from the cubin, no spills, tensor cores for its fp16/bf16 dot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--subset", "--cases", r"^lora 4096x4096 M1 r16 b16 bf16 plain",
         "--only", "lora_shrink_kernel", "--workers", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| lora_shrink_kernel")]
    assert rows, out.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    sm80_regs, sm80_spills, sm80_mma, sm90_regs, sm90_mma = cells[3], cells[4], cells[6], cells[7], cells[10]
    assert int(sm80_regs) > 0 and int(sm90_regs) > 0 and sm80_spills == "0/0"
    assert sm80_mma == "HMMA" and sm90_mma in ("HMMA", "HGMMA")
    assert "0 compile errors" in out.stdout


def test_the_subset_is_drawn_from_the_shared_registry():
    assert set(aot_check.SUBSET_M) <= set(shapes.SWEEP_M) and set(aot_check.SUBSET_RANKS) <= set(shapes.SWEEP_RANKS)
    full = [case for case, _ in aot_check.sweep_cases(subset=False)]
    assert len({case.split()[1] for case in full if case.startswith("lora ")}) == len(shapes.MODEL_SHAPES)


def test_results_cache_resumes_a_sweep_and_the_time_limit_stops_it(tmp_path, monkeypatch):
    """The full sweep runs for hours on 2 cores: a time limit stops it (nothing new starts), the JSON-lines cache
    keeps every result, and the next run compiles only what is missing; the rules' specialisations go first."""
    specs = aot_check.distinct_specs(aot_check.enumerate_launches(cases=list(_few_cases())))
    order = aot_check.compile_order(specs)
    first = {id(s) for s in aot_check.coarse_subset(specs)}
    assert {id(specs[i]) for i in order[: len(first)]} == first  # the subset's representatives first
    kinds = [specs[i].dtype in aot_check.SIXTEEN_BIT for i in order]
    assert kinds == sorted(kinds, reverse=True)  # every 16-bit specialisation before any float32 one
    few = specs[:3]
    calls = []
    fake = dict(error=None, shared=0, spill_stores=0, spill_loads=0, local=0, registers=32, dots=0, dots16=0, mma="-")

    def compile_job(job):
        calls.append(job)
        return job[0], job[1], {**fake, "arch": job[1]}

    monkeypatch.setattr(aot_check, "_compile_job", compile_job)
    cache = str(tmp_path / "results.jsonl")
    assert aot_check.compile_all(few, workers=1, results_file=cache, time_limit=0) == {} and not calls
    full = aot_check.compile_all(few, workers=1, results_file=cache)
    assert len(full) == len(calls) == 3 * len(aot_check.ARCHS)
    assert aot_check.compile_all(few, workers=1, results_file=cache) == full and len(calls) == len(full)
    table, failures = aot_check.report(few, full)
    assert failures == [] and "compiled 6 of 6" in aot_check.summarise(few, full, aot_check.ARCHS, failures, 1.0)
    kernels = aot_check.kernel_table(few, full)
    assert all(f"| {s.name} |" in kernels for s in few)
    for markdown in (table, kernels):  # header, separator and rows: one column count (else it renders as text)
        assert len({line.count("|") for line in markdown.splitlines() if line.startswith("|")}) == 1
    partial = {k: v for k, v in full.items() if k[0] != 0}
    assert "compiled 4 of 6" in aot_check.summarise(few, partial, aot_check.ARCHS, [], 1.0)


def test_enumeration_cache_round_trips_and_knows_its_sources(tmp_path):
    cache, cases = str(tmp_path / "enum.pickle"), r"^lora 4096x4096 M1 r16 b16 bf16 plain"
    specs, count = aot_check.enumerate_cached(True, cases, cache)
    again, count_again = aot_check.enumerate_cached(True, cases, cache)
    assert count_again == count and [s.key for s in again] == [s.key for s in specs]
    assert all(b.kernel is a.kernel for a, b in zip(specs, again, strict=True))  # the kernels looked up again
    assert aot_check._enumeration_key(True, cases) != aot_check._enumeration_key(True, cases + " gemm=auto")


def test_results_key_ignores_layout_comments_and_docstrings_not_code(tmp_path):
    """A cached result stays valid when a kernel is reformatted or re-documented, and only then: a changed body, a
    changed JIT helper it calls or a changed module constant it reads is a new key."""
    helper = "@triton.jit\ndef helper(x):\n    return x * {factor}\n"
    kernel = "@triton.jit\ndef add_kernel(x_ptr, n, BLOCK: tl.constexpr):\n{doc}    o = tl.arange(0, BLOCK){op}\n"
    kernel += "    tl.store(x_ptr + o, helper(tl.load(x_ptr + o, mask=o < n)) + LIMIT, mask=o < n)\n"
    variants = {
        "base": dict(factor=2, doc="", op="", limit=1, layout=""),
        "relaid": dict(factor=2, doc='    """Doubles x."""\n', op="  # the lanes", limit=1, layout="\n\n# comment\n"),
        "body": dict(factor=2, doc="", op=" + 1", limit=1, layout=""),
        "helper": dict(factor=3, doc="", op="", limit=1, layout=""),
        "constant": dict(factor=2, doc="", op="", limit=2, layout=""),
    }
    digests = {}
    for name, v in variants.items():
        path = tmp_path / f"aot_digest_{name}.py"
        path.write_text("import triton\nimport triton.language as tl\n" + v["layout"] + f"LIMIT = {v['limit']}\n"
                        + helper.format(**v) + kernel.format(**v))  # fmt: skip
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        digests[name] = aot_check.code_digest(module.add_kernel)
    assert digests["relaid"] == digests["base"]
    assert len({digests[k] for k in ("base", "body", "helper", "constant")}) == 4
