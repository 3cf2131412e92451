#!/usr/bin/env bash
# The one script a session with a lent GPU runs (through the device tool, in the repo root):
#
#     bash scripts/gpu_run.sh
#
# The GPU image has python3 with torch (CUDA), triton, peft, pytest, pytest-benchmark, pybind11, ninja and nvcc,
# and no network. Steps, each logged to $OUT (what the device tool brings back; at most 8 files, flat):
#   env      nvidia-smi, versions, then `pip install -e . --no-build-isolation --no-deps` (offline)   -> env.log
#   gpu      python3 -m pytest tests -q -m gpu   (realistic sizes, bf16)                               -> tests_gpu.log
#   suite    python3 -m pytest tests -q -m "not gpu" on the GPU: tests/conftest.py picks DEVICE=cuda when CUDA is
#            there (no TRITON_INTERPRET), so the Triton-parametrised cases run the real kernels on CUDA
#            (the gpu-marked part already ran in the step before)                                  -> tests_suite.log
#   sanitizer LOWRANK_KERNELS_BACKEND=cuda compute-sanitizer --tool memcheck python3 -m pytest on a small selection
#            of the CUDA-extension cases (GPU_RUN_SANITIZER_K): every csrc kernel, bounds-checked    -> sanitizer.log
#   bench    python3 -m pytest benchmarks/ --benchmark-only --benchmark-json=$OUT/bench.json          -> bench.log,
#            every row also streamed to bench.jsonl as it is measured (survives a timeout)            bench.json(l)
#   report   python3 benchmarks/report.py $OUT/bench.json (bench.jsonl if the JSON is missing)        -> report.md
#
# Environment (all optional):
#   GPU_RUN_STEPS="gpu,suite,sanitizer,bench"   subset of those (env + install and report always run)
#   GPU_RUN_DEADLINE_S=480            whole-run budget: every step gets a timeout from what is left, and the
#                                     benchmarks skip rows that would start past it (LOWRANK_BENCH_BUDGET_S), so
#                                     the run ends inside one 10-minute device call with its JSON written
#   GPU_RUN_TEST_ARGS="-k triton"     extra pytest arguments for the gpu and suite steps
#   GPU_RUN_SANITIZER_K="..."         the sanitizer step's pytest -k expression (default: see below)
#   GPU_RUN_BENCH_PATH=benchmarks/test_dora_bench.py   what the bench step collects (default benchmarks/)
#   GPU_RUN_BENCH_ARGS="-k fwd-"      extra pytest arguments for the bench step (e.g. one op, one shape)
#   LOWRANK_BENCH_QUICK=1             benchmarks on 4096x4096 only (1/3 of the matrix)
#   LOWRANK_KERNELS_CUDA_ARCHS        arch list for the CUDA extension (default here: this GPU's, e.g. "90")
#   LOWRANK_KERNELS_SKIP_CUDA_BUILD=1 do not build csrc/
#
# Expected time on one H100 (estimate, nothing measured yet): install ~10 s (+~10 s for csrc/: its clean build took
# 9 s on a 2-core CPU machine for sm80 + sm90), tests 1-3 min, compute-sanitizer 1-2.5 min, full benchmark matrix
# 2-4 min (408 rows, do_bench rep 50 ms, ~0.15 s a decode row and ~0.3 s a prefill row, plus Triton compiles and the
# peft import): ~5-9 min in all, bounded by GPU_RUN_DEADLINE_S.
# Exit status: 0 when every step that ran passed (a machine without a visible GPU fails).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE_S="${GPU_RUN_DEADLINE_S:-480}"
STEPS=",${GPU_RUN_STEPS:-gpu,suite,sanitizer,bench},"
read -r -a TEST_ARGS <<<"${GPU_RUN_TEST_ARGS:-}"
read -r -a BENCH_ARGS <<<"${GPU_RUN_BENCH_ARGS:-}"
declare -A RESULT=()
FAILED=0

left() { echo $((DEADLINE_S - SECONDS)); }
log() { printf '\n==> [%4ss] %s\n' "$SECONDS" "$*" | tee -a "$OUT/env.log"; }

# run_step NAME LOGFILE TIMEOUT_S CMD...: runs CMD under `timeout` (SIGINT first, so pytest prints its summary),
# tees its output to $OUT/LOGFILE, records the exit status.
run_step() {
  local name=$1 logfile=$2 limit=$3
  shift 3
  if ((limit < 20)); then
    echo "skipped: only ${limit}s left of GPU_RUN_DEADLINE_S=${DEADLINE_S}" | tee "$OUT/$logfile"
    RESULT[$name]="skipped (no time left)"
    FAILED=1
    return
  fi
  log "$name (timeout ${limit}s): $*"
  printf '$ %s\n' "$*" >"$OUT/$logfile"
  timeout -k 20 -s INT "$limit" "$@" 2>&1 | tee -a "$OUT/$logfile"
  local rc=${PIPESTATUS[0]}
  case $rc in
    0) RESULT[$name]="ok" ;;
    5) RESULT[$name]="no tests collected (pytest exit 5)" ;;
    124 | 130 | 137) RESULT[$name]="TIMED OUT after ${limit}s (exit $rc)"; FAILED=1 ;;
    *) RESULT[$name]="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  log "$name: ${RESULT[$name]}"
}

min() { (($1 < $2)) && echo "$1" || echo "$2"; }

# ---- env + install --------------------------------------------------------------------------------------------
: >"$OUT/env.log"
log "machine"
{
  nvidia-smi || echo "nvidia-smi failed"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not found"
  python3 - <<'PY'
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, sm {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
for m in ("triton", "peft", "pytest", "pytest_benchmark", "pybind11"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", e)
PY
} 2>&1 | tee -a "$OUT/env.log"

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "NO CUDA GPU VISIBLE to torch: GPU tests and benchmarks will skip; this run proves nothing about the GPU" \
    | tee -a "$OUT/env.log"
  RESULT[cuda]="FAILED: torch.cuda.is_available() is False"
  FAILED=1
fi

if [[ -z "${LOWRANK_KERNELS_CUDA_ARCHS:-}" ]]; then
  LOWRANK_KERNELS_CUDA_ARCHS=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "80;90")
  export LOWRANK_KERNELS_CUDA_ARCHS
fi
export MAX_JOBS="${MAX_JOBS:-16}"
log "install (LOWRANK_KERNELS_CUDA_ARCHS=$LOWRANK_KERNELS_CUDA_ARCHS)"
timeout -k 10 "$(min 300 "$(left)")" python3 -m pip install -e . --no-build-isolation --no-deps 2>&1 | tail -n 25 | tee -a "$OUT/env.log"
if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
  RESULT[install]="FAILED"
  FAILED=1
else
  RESULT[install]="ok"
fi
python3 -c "import lowrank_kernels, glob, os; print('lowrank_kernels', lowrank_kernels.__version__, 'from', os.path.dirname(lowrank_kernels.__file__)); print('CUDA extension:', glob.glob(os.path.dirname(lowrank_kernels.__file__) + '/_C*.so') or 'not built')" 2>&1 | tee -a "$OUT/env.log"

# ---- tests -----------------------------------------------------------------------------------------------------
# Budget: the gpu and suite steps leave at least ~3 minutes for the benchmarks.
if [[ $STEPS == *,gpu,* ]]; then
  run_step gpu tests_gpu.log "$(min 150 $(($(left) - 200)))" python3 -m pytest tests -q -m gpu "${TEST_ARGS[@]}"
fi
if [[ $STEPS == *,suite,* ]]; then
  run_step suite tests_suite.log "$(min 180 $(($(left) - 180)))" python3 -m pytest tests -q -m "not gpu" "${TEST_ARGS[@]}"
fi

# ---- compute-sanitizer on the CUDA extension's kernels -------------------------------------------------------------
# Small shapes, every kernel of csrc/ (LoRA fwd/bwd with dropout, DoRA norm/fwd/bwd, multi-adapter with corrupt ids):
# memcheck slows every launch (torch's own included), so the selection stays at a few dozen cases.
SANITIZER_K="${GPU_RUN_SANITIZER_K:-(cuda-triton-bfloat16 and (M7- or M65- or M130- or decode-M5)) or (cuda-bfloat16 and (some-none or truncated or dora_and_lora)) or corrupt or gpu_dropout_mask}"
if [[ $STEPS == *,sanitizer,* ]]; then
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [[ ! -x $SANITIZER ]]; then
    echo "compute-sanitizer not found (looked on PATH and in ${CUDA_HOME:-/usr/local/cuda}/bin)" | tee "$OUT/sanitizer.log"
    RESULT[sanitizer]="FAILED: compute-sanitizer not found"
    FAILED=1
  else
    LOWRANK_KERNELS_BACKEND=cuda run_step sanitizer sanitizer.log "$(min 150 $(($(left) - 150)))" \
      "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 \
      python3 -m pytest tests/test_cuda_ext.py tests/test_lora_ops.py tests/test_dora.py tests/test_multi_lora.py \
      -q -p no:cacheprovider -k "$SANITIZER_K"
  fi
fi

# ---- benchmarks ------------------------------------------------------------------------------------------------
if [[ $STEPS == *,bench,* ]]; then
  rm -f "$OUT/bench.json" "$OUT/bench.jsonl"
  bench_limit=$(($(left) - 15))
  # Rows that would start in the last ~60 s are skipped, so pytest-benchmark still ends and writes its JSON.
  export LOWRANK_BENCH_BUDGET_S=$((bench_limit - 60)) LOWRANK_BENCH_JSONL="$OUT/bench.jsonl"
  run_step bench bench.log "$bench_limit" python3 -m pytest "${GPU_RUN_BENCH_PATH:-benchmarks/}" --benchmark-only \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,max,rounds -q "${BENCH_ARGS[@]}"
  rows=$(cat "$OUT/bench.jsonl" 2>/dev/null | wc -l)
  log "bench: $rows rows measured"
  if ((rows == 0)); then
    RESULT[bench]="${RESULT[bench]}; NO ROWS MEASURED"
    FAILED=1
  fi
fi

# ---- report ----------------------------------------------------------------------------------------------------
echo "No benchmark results in this run (see bench.log)." >"$OUT/report.md"
for src in "$OUT/bench.json" "$OUT/bench.jsonl"; do
  if [[ -s $src ]]; then
    log "report from $(basename "$src")"
    python3 benchmarks/report.py "$src" | tee "$OUT/report.md"
    break
  fi
done

log "summary (GPU_RUN_DEADLINE_S=$DEADLINE_S)"
for name in cuda install gpu suite sanitizer bench; do
  [[ -n ${RESULT[$name]:-} ]] && echo "$name: ${RESULT[$name]}" | tee -a "$OUT/env.log"
done
ls -la "$OUT" | tee -a "$OUT/env.log"
exit "$FAILED"
