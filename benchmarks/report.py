"""Print the benchmark ratio tables (markdown) from a pytest-benchmark JSON or the JSONL stream of a run.

    python benchmarks/report.py bench.json        # pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.jsonl       # LOWRANK_BENCH_JSONL=bench.jsonl: rows written as they finish

Ratios are a provider's time over its baseline's, timed in the same process on the same inputs (lower is better;
1.00 = the adapter is free). At M <= 64 (decode) the ratio is of CUDA-graph replays when both sides were captured
(how serving engines run decode; marked ``*`` when only CUDA-event times exist), else of CUDA-event medians.
First-milestone goals as below. Needs only the standard library: no GPU, no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

DECODE_MAX_M = 64
PROVIDERS = ("fused", "tritongemm", "cuda", "eager", "peft")
BASELINE = {"fwd": "cublas", "fwdbwd": "frozen"}
OP_TITLE = {"fwd": "LoRA forward", "fwdbwd": "LoRA forward + backward"}
# First milestone, fused over baseline; (min M it applies from, limit). fwd+bwd has no decode goal.
GOALS = {"fwd": (1, 1.10), "fwdbwd": (2048, 1.15)}
RANK_GOAL = 1.00  # time at b=8 over time at b=64, same R=64


def load_rows(path: Path) -> tuple[list[dict], dict]:
    """Rows (each a benchmark's extra_info) and the environment (GPU, versions) from a .json or .jsonl file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        env = {}
    else:
        data = json.loads(text)
        rows = [{"id": b["name"], **(b.get("extra_info") or {})} for b in data["benchmarks"]]
        env = dict((data.get("machine_info") or {}).get("lowrank_kernels_env") or {})
        env.setdefault("datetime", data.get("datetime"))
    rows = [r for r in rows if r.get("kind") in ("lora", "rankcmp")]
    for row in rows:  # the environment is also stamped on every row (all a JSONL stream has)
        for key in ("gpu", "torch", "triton", "cuda"):
            if row.get(key) and not env.get(key):
                env[key] = row[key]
    return rows, env


def headline(row: dict) -> tuple[float | None, str]:
    """The ratio the goals are judged on, and a marker: graph replays at decode when both sides have them."""
    if row["M"] <= DECODE_MAX_M:
        if row.get("graph_ratio") is not None:
            return row["graph_ratio"], ""
        return row.get("ratio"), "*"
    return row.get("ratio"), ""


def base_time(row: dict) -> tuple[float | None, str]:
    if row["M"] <= DECODE_MAX_M and row.get("baseline_graph_us") is not None:
        return row["baseline_graph_us"], " (g)"
    return row.get("baseline_us"), ""


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def shape_key(shape: str) -> tuple[int, int]:
    k, n = shape.split("x")
    return int(k), int(n)


def goal_cell(op: str, M: int, ratio: float | None) -> tuple[str, bool | None]:
    min_m, limit = GOALS[op]
    if M < min_m:
        return "n/a", None
    if ratio is None:
        return "no data", False
    return ("ok" if ratio <= limit else f"MISS (> {limit:.2f})"), ratio <= limit


def lora_table(rows: list[dict], op: str, misses: list[str], counts: dict) -> list[str]:
    by_case: dict[tuple, dict[str, dict]] = defaultdict(dict)
    baselines: dict[tuple, dict] = {}
    for row in rows:
        if row["kind"] != "lora" or row["op"] != op:
            continue
        if row["provider"] == BASELINE[op]:
            baselines[(row["shape"], row["M"])] = row
        else:
            by_case[(row["shape"], row["M"], row["r"], row["b"])][row["provider"]] = row
    if not by_case:
        return []
    min_m, limit = GOALS[op]
    goal_title = f"fused <= {limit:.2f}" + ("" if min_m <= 1 else f" (M >= {min_m})")
    out = [
        f"## {OP_TITLE[op]} (ratio to {BASELINE[op]})",
        "",
        f"| shape KxN | M | r | b | {BASELINE[op]} µs | fused | triton GEMM | cuda | eager | peft | {goal_title} "
        "| fused <= eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    keys = sorted(by_case, key=lambda k: (shape_key(k[0]), k[1], k[2], k[3]))
    for shape, M, r, b in keys:
        provs = by_case[(shape, M, r, b)]
        any_row = next(iter(provs.values()))
        t_base, g = base_time(baselines.get((shape, M)) or any_row)
        cells = {}
        for p in PROVIDERS:
            if p in provs:
                ratio, mark = headline(provs[p])
                cells[p] = (ratio, fmt(ratio) + mark)
            else:
                cells[p] = (None, "-")
        fused = cells["fused"][0]
        goal, met = goal_cell(op, M, fused if "fused" in provs else None)
        if met is not None:
            counts[op][met] += 1
            if not met:
                misses.append(f"{op} {shape} M={M} r={r} b={b}: fused {fmt(fused)} (goal <= {limit:.2f})")
        eager = cells["eager"][0]
        vs_eager = "-" if fused is None or eager is None else ("ok" if fused <= eager else "SLOWER")
        if vs_eager == "SLOWER":
            misses.append(f"{op} {shape} M={M} r={r} b={b}: fused {fmt(fused)} slower than eager {fmt(eager)}")
        out.append(
            f"| {shape} | {M} | {r} | {b} | {fmt(t_base, 1)}{g} | {cells['fused'][1]} | {cells['tritongemm'][1]} | "
            f"{cells['cuda'][1]} | {cells['eager'][1]} | {cells['peft'][1]} | {goal} | {vs_eager} |"
        )
    return [*out, ""]


def rank_table(rows: list[dict], misses: list[str], counts: dict) -> list[str]:
    cmp_rows = sorted(
        (r for r in rows if r["kind"] == "rankcmp"), key=lambda r: (r["op"] != "fwd", shape_key(r["shape"]), r["M"])
    )
    if not cmp_rows:
        return []
    out = [
        "## Active rank: fused at b=8 vs b=64 (same R=64 tensors)",
        "",
        f"| op | shape KxN | M | b=8 µs | b=64 µs | ratio | b=8 <= b=64 (<= {RANK_GOAL:.2f}) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in cmp_rows:
        ratio, mark = headline(row)
        graphed = row["M"] <= DECODE_MAX_M and row.get("graph_us") is not None
        t_low = row["graph_us"] if graphed else row["median_us"]
        t_full = row["baseline_graph_us"] if graphed else row["baseline_us"]
        met = ratio is not None and ratio <= RANK_GOAL
        counts["rank"][met] += 1
        if not met:
            misses.append(f"rank {row['op']} {row['shape']} M={row['M']}: b=8 / b=64 = {fmt(ratio, 3)}")
        g = " (g)" if graphed else ""
        out.append(
            f"| {row['op']} | {row['shape']} | {row['M']} | {fmt(t_low, 1)}{g} | {fmt(t_full, 1)}{g} | "
            f"{fmt(ratio, 3)}{mark} | {'ok' if met else 'MISS'} |"
        )
    return [*out, ""]


def detail_table(rows: list[dict]) -> list[str]:
    out = [
        "## Detail (µs; ev = CUDA-event median, graph = CUDA-graph replay; floor = H100 roofline of the base op)",
        "",
        "| id | ev | graph | baseline ev | baseline graph | ratio ev | ratio graph | max rel err | peak MiB | floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        graph = fmt(row.get("graph_us"), 1) if not row.get("graph_error") else "capture failed"
        out.append(
            f"| {row['id']} | {fmt(row.get('median_us'), 1)} | {graph} | {fmt(row.get('baseline_us'), 1)} | "
            f"{fmt(row.get('baseline_graph_us'), 1)} | {fmt(row.get('ratio'))} | {fmt(row.get('graph_ratio'))} | "
            f"{fmt_err(row.get('max_rel_err'))} | {fmt(row.get('peak_mib'), 1)} | {fmt(row.get('floor_us'), 1)} |"
        )
    errors = [f"- {row['id']}: {row['graph_error']}" for row in rows if row.get("graph_error")]
    if errors:
        out += ["", "CUDA-graph capture failures:", *errors]
    return [*out, ""]


def report(rows: list[dict], env: dict, *, detail: bool = True) -> str:
    versions = ", ".join(
        f"{name} {env[key]}"
        for name, key in (("torch", "torch"), ("triton", "triton"), ("CUDA", "cuda"), ("peft", "peft"))
        if env.get(key)
    )
    gpu = env.get("gpu") or "unknown GPU"
    labels = (("sm", "gpu_capability"), ("SMs", "gpu_sms"), ("driver", "driver"))
    extras = [f"{label} {env[key]}" for label, key in labels if env.get(key)]
    head = [
        "# lowrank_kernels benchmark report",
        "",
        f"GPU: **{gpu}**"
        + (f" ({', '.join(extras)})" if extras else "")
        + f"; {versions}; bf16."
        + (f" Run: {env['datetime']}." if env.get("datetime") else ""),
        "",
        "Ratios: provider time / baseline time, same process, same inputs (lower is better; 1.00 = adapter free).",
        "M <= 64: CUDA-graph replays (`*` = CUDA-event medians only); M >= 2048: CUDA-event medians. "
        "Baseline µs marked (g) are graph replays. `fused` is `lora_linear` on the Triton backend as dispatched "
        "(one fused launch at M <= 64, cuBLAS + low-rank epilogue above); `triton GEMM` forces our own GEMM "
        "above M = 64 (LOWRANK_KERNELS_LORA_GEMM=triton); `cuda` is the CUDA C++ fallback backend (csrc/).",
        "",
    ]
    if any(row.get("quick") for row in rows):
        head += ["Quick run (LOWRANK_BENCH_QUICK=1): 4096x4096 only.", ""]
    misses: list[str] = []
    counts = {k: {True: 0, False: 0} for k in ("fwd", "fwdbwd", "rank")}
    body = [*lora_table(rows, "fwd", misses, counts), *lora_table(rows, "fwdbwd", misses, counts)]
    body += rank_table(rows, misses, counts)
    summary = ["## First-milestone goals", ""]
    labels = {
        "fwd": "LoRA fwd, fused <= 1.10 x cuBLAS, every M",
        "fwdbwd": "LoRA fwd+bwd, fused <= 1.15 x frozen fwd+bwd, M >= 2048",
        "rank": "time at b=8 <= time at b=64 (R=64)",
    }
    for key, label in labels.items():
        met, missed = counts[key][True], counts[key][False]
        summary.append(f"- {label}: {met} of {met + missed} rows met" if met + missed else f"- {label}: no rows")
    summary += ["", "Misses:" if misses else "No misses.", *[f"- {m}" for m in misses], ""]
    tail = detail_table(rows) if detail else []
    if not rows:
        return "\n".join([*head, "No benchmark rows found (did every benchmark skip? no GPU?).", ""])
    return "\n".join([*head, *summary, *body, *tail])


def load_host_rows(path: Path) -> list[dict]:
    """The host-overhead rows (benchmarks/test_host_overhead_bench.py) of a pytest-benchmark JSON."""
    if path.suffix == ".jsonl":
        return []
    data = json.loads(path.read_text())
    return [b["extra_info"] for b in data["benchmarks"] if (b.get("extra_info") or {}).get("kind") == "host"]


def host_table(rows: list[dict]) -> str:
    """Host overhead per call (CPU, one thread, eval, no grad) per size, against nn.Linear and the peft peer."""
    if not rows:
        return ""
    lines = ["## Host overhead per call (CPU, one thread, eval, no grad)", "",
             "decode: x [1, 64], 64 -> 64, r = 8; prefill: x [64, 1024], 1024 -> 1024, r = 16 (float32).", "",
             "| size | row | path | median µs | / nn.Linear | peft peer | / peer |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    medians = {(r.get("size", "decode"), r["row"], r["path"]): r["median_us"] for r in rows}
    for row in sorted(rows, key=lambda r: (r.get("size", "decode"), r["median_us"])):
        size, t = row.get("size", "decode"), row["median_us"]
        linear = medians.get((size, "nn.Linear", "torch"))
        peer = row.get("peer")
        peer_t = medians.get((size, peer, "torch")) if peer else None
        lines.append(f"| {size} | {row['row']} | {row['path']} | {t:.1f} | {fmt(linear and t / linear)} | "
                     f"{peer or '—'} | {fmt(peer_t and t / peer_t)} |")  # fmt: skip
    note = ("`triton-stubbed`: the Triton backend's whole host path with each kernel launch replaced by a no-op "
            "(what a GPU call pays on top of its launches).")  # fmt: skip
    return "\n".join([*lines, "", note, ""]) + "\n"


def load_peft_train_rows(path: Path) -> list[dict]:
    """The patched-vs-peft training-step rows (benchmarks/test_peft_patch_bench.py) of a .json or .jsonl file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = [b.get("extra_info") or {} for b in json.loads(text)["benchmarks"]]
    return [r for r in rows if r.get("kind") == "peft_train"]


def peft_train_table(rows: list[dict]) -> str:
    """A peft model's training step, unpatched vs patch_peft_model (ratio < 1: the patch is faster)."""
    patched = [r for r in rows if r.get("provider") == "patched"]
    if not patched:
        return ""
    lines = ["## peft training step: patch_peft_model vs peft (forward, backward, AdamW; bf16)", "",
             "| adapter | model | tokens | peft µs | patched µs | patched / peft | layers patched |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in patched:
        layers = f"{r.get('patched_layers')} (+{r.get('unpatched_layers')} on peft)"
        lines.append(f"| {r['op']} | {r['shape']} | {r['M']} | {fmt(r.get('peft_us'), 1)} | {fmt(r['median_us'], 1)} "
                     f"| {fmt(r.get('ratio'))} | {layers} |")  # fmt: skip
    return "\n".join([*lines, ""]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="pytest-benchmark JSON (--benchmark-json) or LOWRANK_BENCH_JSONL file")
    parser.add_argument("--no-detail", action="store_true", help="leave out the per-row µs table")
    args = parser.parse_args(argv)
    try:
        rows, env = load_rows(args.path)
    except (OSError, ValueError, KeyError) as exc:  # missing, empty (pytest-benchmark saved nothing) or not ours
        print(f"report.py: cannot read {args.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    host = load_host_rows(args.path)
    if rows or not host:
        sys.stdout.write(report(rows, env, detail=not args.no_detail))
    sys.stdout.write(host_table(host))
    sys.stdout.write(peft_train_table(load_peft_train_rows(args.path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
