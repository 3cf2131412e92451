#!/usr/bin/env bash
# The one script a session with a lent GPU runs (through the device tool, in the repo root):
#
#     bash scripts/gpu_run.sh
#
# The GPU image has python3 with torch (CUDA), triton (3.6), peft, pytest, pytest-benchmark, pybind11, ninja and
# nvcc, and no network. Everything finishes inside GPU_RUN_DEADLINE_S (480 s: one 10-minute device call with room for
# the machine's start), priorities first, each step under `timeout` with what is left; results go to 8 flat files in
# $OUT (what the device tool brings back):
#   env       nvidia-smi, versions, `pip install -e . --no-build-isolation --no-deps` (offline; builds csrc/ for
#             this GPU's arch)                                                                      -> env.log
#   gpu       correctness of every kernel at realistic sizes: python3 -m pytest tests -m gpu, strict
#             (LOWRANK_KERNELS_STRICT=1: a kernel that fails raises, nothing falls back)           -> tests_gpu.log
#   suite     the rest of the suite on the GPU, strict: tests/conftest.py picks DEVICE=cuda (no TRITON_INTERPRET),
#             so the Triton-parametrised cases run the real kernels                                  -> tests_suite.log
#   headline  the benchmark rows the goals are judged on (LoRA fwd M=1 and fwd+bwd M=2048 on 4096x4096 with their
#             baselines, DoRA the same, multi-adapter n=32 M=64 and n=128 M=512)        -> bench.json, bench.log
#   sanitizer compute-sanitizer memcheck on the CUDA extension's kernels, small shapes: one contiguous bf16 case of
#             each GPU test of tests/test_cuda_ext.py, the corrupt-metadata and dropout-mask ones  -> sanitizer.log
#   matrix    the rest of the benchmark matrix on 4096x4096 (LOWRANK_BENCH_QUICK=1) in what time is left; rows
#             that would start past the deadline are skipped                               -> bench.log (appended)
#   report    python3 benchmarks/report.py over bench.jsonl (every row of both bench steps, streamed as measured,
#             so it survives a timeout; bench.json if that is missing)                     -> report.md, bench.jsonl
#
# Environment (all optional):
#   GPU_RUN_STEPS="gpu,suite,headline,sanitizer,matrix"   subset of those (env + install and report always run)
#   GPU_RUN_DEADLINE_S=480            whole-run budget; every step's timeout comes from what is left
#   GPU_RUN_TEST_ARGS="-k triton"     extra pytest arguments for the gpu and suite steps
#   GPU_RUN_SANITIZER_K="..."         the sanitizer step's pytest -k expression (default: see below)
#   GPU_RUN_HEADLINE_K="..."          the headline step's pytest -k expression (default: see below)
#   GPU_RUN_BENCH_ARGS="-k fwd-"      extra pytest arguments for the matrix step
#   LOWRANK_KERNELS_CUDA_ARCHS        arch list for the CUDA extension (default here: this GPU's, e.g. "90")
#   LOWRANK_KERNELS_SKIP_CUDA_BUILD=1 do not build csrc/
#
# Expected time on one H100/H200 (estimate, nothing measured yet): install ~10 s (+~10 s for csrc/ at MAX_JOBS=16),
# gpu tests ~1-2 min (Triton compiles dominate), suite ~1-2.5 min, headline ~30-60 s, sanitizer ~1 min, the matrix
# whatever is left (it is cut, not the steps before it). Budgets below: each step's cap, and a reserve it leaves for
# the steps after it, so a slow step costs the matrix first and never the report.
# Exit status: 0 when every step that ran passed (a machine without a visible GPU fails).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export LOWRANK_KERNELS_STRICT=1  # no step may pass by falling back from a kernel that failed
DEADLINE_S="${GPU_RUN_DEADLINE_S:-480}"
STEPS=",${GPU_RUN_STEPS:-gpu,suite,headline,sanitizer,matrix},"
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
    echo "$name skipped: only ${limit}s left of GPU_RUN_DEADLINE_S=${DEADLINE_S}" | tee -a "$OUT/$logfile"
    RESULT[$name]="skipped (no time left)"
    FAILED=1
    return
  fi
  log "$name (timeout ${limit}s): $*"
  if [[ -n ${APPEND:-} ]]; then
    printf '$ %s\n' "$*" >>"$OUT/$logfile"
  else
    printf '$ %s\n' "$*" >"$OUT/$logfile"
  fi
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

# run_step_append: run_step, appending to LOGFILE (the matrix step shares bench.log with the headline step).
run_step_append() {
  APPEND=1 run_step "$@"
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
timeout -k 10 "$(min 180 "$(left)")" python3 -m pip install -e . --no-build-isolation --no-deps 2>&1 | tail -n 25 | tee -a "$OUT/env.log"
if [[ ${PIPESTATUS[0]} -ne 0 ]]; then
  RESULT[install]="FAILED"
  FAILED=1
else
  RESULT[install]="ok"
fi
python3 -c "import lowrank_kernels, glob, os; print('lowrank_kernels', lowrank_kernels.__version__, 'from', os.path.dirname(lowrank_kernels.__file__)); print('CUDA extension:', glob.glob(os.path.dirname(lowrank_kernels.__file__) + '/_C*.so') or 'not built')" 2>&1 | tee -a "$OUT/env.log"

# ---- tests: correctness of every kernel first ------------------------------------------------------------------
if [[ $STEPS == *,gpu,* ]]; then
  run_step gpu tests_gpu.log "$(min 150 $(($(left) - 300)))" python3 -m pytest tests -q -m gpu -p no:cacheprovider \
    "${TEST_ARGS[@]}"
fi
if [[ $STEPS == *,suite,* ]]; then
  run_step suite tests_suite.log "$(min 150 $(($(left) - 210)))" python3 -m pytest tests -q -m "not gpu" \
    -p no:cacheprovider "${TEST_ARGS[@]}"
fi

# ---- benchmarks: the headline rows, then (after the sanitizer) the rest of the matrix ------------------------------
rm -f "$OUT/bench.json" "$OUT/bench.jsonl"
export LOWRANK_BENCH_JSONL="$OUT/bench.jsonl"
HEADLINE_K="${GPU_RUN_HEADLINE_K:-(fwd-4096x4096-M1- or fwdbwd-4096x4096-M2048- or multi-4096x4096-M64-r16-n32-distinct or multi-4096x4096-M512-r16-n128-distinct) and not adalora and not rankcmp}"
if [[ $STEPS == *,headline,* ]]; then
  limit=$(min 120 $(($(left) - 90)))
  LOWRANK_BENCH_BUDGET_S=$((limit - 30)) run_step headline bench.log "$limit" python3 -m pytest benchmarks/ \
    --benchmark-only -p no:cacheprovider --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,max,rounds \
    -q -k "$HEADLINE_K"
fi

# ---- compute-sanitizer on the CUDA extension's kernels -------------------------------------------------------------
# Small shapes, one case per kernel test (memcheck slows every launch, torch's own included).
SANITIZER_K="${GPU_RUN_SANITIZER_K:-(test_gpu_ and contiguous and bfloat16 and not realistic) or corrupt or dropout_mask_is_the_naive}"
if [[ $STEPS == *,sanitizer,* ]]; then
  SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [[ ! -x $SANITIZER ]]; then
    echo "compute-sanitizer not found (looked on PATH and in ${CUDA_HOME:-/usr/local/cuda}/bin)" | tee "$OUT/sanitizer.log"
    RESULT[sanitizer]="FAILED: compute-sanitizer not found"
    FAILED=1
  else
    LOWRANK_KERNELS_BACKEND=cuda run_step sanitizer sanitizer.log "$(min 90 $(($(left) - 30)))" \
      "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 \
      python3 -m pytest tests/test_cuda_ext.py -q -p no:cacheprovider -k "$SANITIZER_K"
  fi
fi

if [[ $STEPS == *,matrix,* ]]; then
  limit=$(($(left) - 15))
  # Rows that would start in the last ~45 s are skipped, so pytest ends and the rows so far are in bench.jsonl.
  printf '\n' >>"$OUT/bench.log"
  LOWRANK_BENCH_QUICK=1 LOWRANK_BENCH_BUDGET_S=$((limit - 45)) run_step_append matrix bench.log "$limit" \
    python3 -m pytest benchmarks/ --benchmark-only -p no:cacheprovider --benchmark-json=/tmp/bench_matrix.json \
    --benchmark-columns=min,median,max,rounds -q -k "not ($HEADLINE_K)" "${BENCH_ARGS[@]}"
fi
rows=$(cat "$OUT/bench.jsonl" 2>/dev/null | wc -l)
log "bench: $rows rows measured"
if [[ $STEPS == *,headline,* || $STEPS == *,matrix,* ]] && ((rows == 0)); then
  RESULT[bench]="NO ROWS MEASURED"
  FAILED=1
fi

# ---- report ----------------------------------------------------------------------------------------------------
echo "No benchmark results in this run (see bench.log)." >"$OUT/report.md"
for src in "$OUT/bench.jsonl" "$OUT/bench.json"; do
  if [[ -s $src ]]; then
    log "report from $(basename "$src")"
    timeout -k 5 60 python3 benchmarks/report.py "$src" | tee "$OUT/report.md"
    break
  fi
done

log "summary (GPU_RUN_DEADLINE_S=$DEADLINE_S)"
for name in cuda install gpu suite headline sanitizer matrix bench; do
  [[ -n ${RESULT[$name]:-} ]] && echo "$name: ${RESULT[$name]}" | tee -a "$OUT/env.log"
done
ls -la "$OUT" | tee -a "$OUT/env.log"
exit "$FAILED"
