#!/usr/bin/env bash
# One command per device call on the GPU machine (see benchmarks/README.md for the exact calls):
#
#   bash benchmarks/gpu_all.sh tests    # deps, build pgsvd_rt._C (CUDA), GPU tests, ALS on CUDA
#   bash benchmarks/gpu_all.sh kernels  # kernel suite 7B + 13B (bf16), microbench (7B, graphs)
#   bash benchmarks/gpu_all.sh e2e      # 7B-shaped e2e: dense, pgsvd-40
#   bash benchmarks/gpu_all.sh e2e-b    # 7B-shaped e2e: svd-als-40, pgsvd-20, svd-als-20
#   bash benchmarks/gpu_all.sh more     # SmolLM2-shaped e2e, suite Mistral/Llama-3/SmolLM2 bf16,
#                                       # 7B fp16
#   bash benchmarks/gpu_all.sh all      # every phase in turn (no 10-minute limit assumed)
#
# Each phase keeps to a time budget (2nd argument or PGSVD_GPU_BUDGET, default 560 s, under the
# device tool's 600 s per call): every step gets `timeout` capped by what is left, a step that
# fails or times out is recorded and the next one runs. Nothing is fetched from a network:
# packages that do not import are installed from wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh,
# carried with carry [".whl"]). Output: $OUT/gpu-<phase>.tar.gz (raw JSON, logs, junit XML, the
# rendered report and plots), $OUT/steps-<phase>.txt and $OUT/report-<phase>.md; locally,
# benchmarks/collect_gpu.sh merges the tarballs into benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-all}
if [ "$PHASE" = all ]; then BUDGET=${2:-${PGSVD_GPU_BUDGET:-3000}}; else BUDGET=${2:-${PGSVD_GPU_BUDGET:-560}}; fi
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
START=$(date +%s)
W=$(mktemp -d /tmp/pgsvd-gpu-XXXXXX)
RAW=$W/raw
mkdir -p "$RAW" "$OUT"
STEPS=$W/steps.txt
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET

left() { echo $((BUDGET - ($(date +%s) - START))); }

step() {  # step NAME LIMIT_S CMD...: run with a time limit capped by the budget; never fails
  local name=$1 limit=$2
  shift 2
  local cap=$(($(left) - 30))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 20 ]; then
    echo "$name SKIPPED (budget spent)" | tee -a "$STEPS"
    return 0
  fi
  local t0
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$W/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(($(date +%s) - t0))s (limit ${limit}s)" | tee -a "$STEPS"
  tail -n 4 "$W/$name.log"
  return 0
}

pack() {
  "$PY" benchmarks/report.py "$RAW" --out "$W/report" >"$W/report.log" 2>&1 ||
    echo "report FAILED (see report.log)" >>"$STEPS"
  cp "$STEPS" "$OUT/steps-$PHASE.txt"
  cp "$W"/report/*.md "$OUT/report-$PHASE.md" 2>/dev/null
  tar czf "$OUT/gpu-$PHASE.tar.gz" -C "$W" .
  echo "packed $OUT/gpu-$PHASE.tar.gz ($(du -h "$OUT/gpu-$PHASE.tar.gz" | cut -f1)); $(left)s of budget left"
}
trap pack EXIT

missing() {  # the names of $@ that are not installed, checked in one interpreter
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

deps() {  # install from .whl/ what is missing; the required ones must be there afterwards
  local m f w files=() miss
  miss=$(missing torch triton)
  [ -z "$miss" ] || { echo "FATAL: $miss not installed" | tee -a "$STEPS"; exit 2; }
  declare -A WH=([transformers]=transformers [safetensors]=safetensors [tokenizers]=tokenizers
    [tqdm]=tqdm [numpy]=numpy [pytest]=pytest [pytest_benchmark]="pytest_benchmark py_cpuinfo"
    [accelerate]=accelerate [gguf]=gguf
    [matplotlib]="matplotlib contourpy cycler fonttools kiwisolver pyparsing python_dateutil pillow six")
  for m in $(missing "${!WH[@]}"); do
    for w in ${WH[$m]}; do
      f=$(ls .whl/"$w"-*.whl 2>/dev/null | head -n 1)
      if [ -n "$f" ]; then files+=("$f"); else echo "deps: $m missing, no .whl/$w-*.whl" | tee -a "$STEPS"; fi
    done
  done
  if [ ${#files[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${files[@]}" && export PYTHONPATH=/tmp/site
    echo "deps: installed ${files[*]}" | tee -a "$STEPS"
  fi
  miss=$(missing transformers safetensors tokenizers tqdm numpy pytest pytest_benchmark)
  [ -z "$miss" ] || { echo "FATAL: $miss missing (benchmarks/fetch_gpu_wheels.sh, carry .whl)" | tee -a "$STEPS"; exit 2; }
  "$PY" - >>"$STEPS" 2>&1 <<'EOF'
import torch, triton, transformers
print("versions: torch", torch.__version__, "triton", triton.__version__, "transformers",
      transformers.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$STEPS" 2>&1
}

install_pkg() {  # $1 = native|any: editable install, with the CUDA extension when native
  if "$PY" -c "import pgsvd_rt.ops as o, pgsvd_rt.kernels.lowrank_matmul; assert o.native_available() or '$1' != native" 2>/dev/null; then
    echo "pgsvd_rt already installed ($1)" >>"$STEPS"
    return 0
  fi
  step build 330 "$PY" -m pip install --no-build-isolation --no-deps -e .
  if ! "$PY" -c "import pgsvd_rt.kernels.lowrank_matmul" 2>/dev/null; then
    PGSVD_NO_NATIVE=1 step install_no_native 90 "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
}

install_quick() {  # kernels/e2e need no native code: a pure-Python editable install if none yet
  "$PY" -c "import pgsvd_rt.kernels.lowrank_matmul" 2>/dev/null && return 0
  PGSVD_NO_NATIVE=1 step install_no_native 120 "$PY" -m pip install --no-build-isolation --no-deps -e .
}

suite() {  # suite TAG MODELS DTYPES LIMIT: one pytest-benchmark JSON per model group
  PGSVD_BENCH_SCOPE=full PGSVD_BENCH_MODELS=$2 PGSVD_BENCH_DTYPES=$3 \
    step "suite-$1" "$4" "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_kernels_bench.py \
    "--benchmark-json=$RAW/kernels-bench-$1.json" --benchmark-columns=median,iqr,rounds
}

phase_tests() {
  deps
  install_pkg native
  step pytest-gpu 200 "$PY" -m pytest -q -m gpu tests "--junitxml=$W/junit-gpu.xml"
  step pytest-ops-kernels 200 "$PY" -m pytest -q -m "not slow" tests/ops tests/kernels \
    "--junitxml=$W/junit-ops-kernels.xml"
  step als-cuda 200 "$PY" benchmarks/bench_als.py --device cuda --out "$RAW" --no-build \
    --closed-form-layers 2 --repeats 1
}

phase_kernels() {
  deps
  install_quick
  # The 7B suite first: it alone answers "fused vs two matmuls vs dense at M = 1 and 4096, and
  # the fraction of the bandwidth ceiling" (ceilings are measured in the same run).
  suite llama2-7b-bf16 llama2-7b bf16 200
  step microbench 200 "$PY" benchmarks/bench_lowrank_matmul.py --out "$RAW"
  suite llama2-13b-bf16 llama2-13b bf16 150
}

phase_e2e() {
  deps
  install_quick
  # Each variant compiles its decode step for batch 1 and 16 (~1-2 min) and pgsvd autotunes its
  # distinct (K, N, R); the JSON is rewritten after every variant, so a cut-off keeps the rest.
  step e2e-7b-40 520 "$PY" benchmarks/bench_e2e.py --model llama2-7b --out "$RAW" \
    --variants dense pgsvd-40
}

phase_e2e_b() {
  deps
  install_quick
  step e2e-7b-b 520 "$PY" benchmarks/bench_e2e.py --model llama2-7b --out "$RAW" \
    --variants svd-als-40 pgsvd-20 svd-als-20
}

phase_more() {
  deps
  install_quick
  # SmolLM2's PGSVD ranks are used as they are (arbitrary, not multiples of 16): pgsvd-40-pad16
  # measures what zero-padding the factors to R = 16k buys the fused kernel end to end.
  step e2e-smollm2 180 "$PY" benchmarks/bench_e2e.py --model smollm2-135m --out "$RAW" \
    --variants dense pgsvd-40 pgsvd-40-pad16 svd-als-40 pgsvd-20 svd-als-20
  suite mistral-llama3-bf16 mistral-7b,llama3-8b bf16 140
  suite smollm2-bf16 smollm2-135m bf16 50
  suite llama2-7b-fp16 llama2-7b fp16 140
}

echo "gpu_all.sh $PHASE: budget ${BUDGET}s, work dir $W" | tee "$STEPS"
case "$PHASE" in
  tests) phase_tests ;;
  kernels) phase_kernels ;;
  e2e) phase_e2e ;;
  e2e-b) phase_e2e_b ;;
  more) phase_more ;;
  all) phase_tests; phase_kernels; phase_e2e; phase_e2e_b; phase_more ;;
  *) echo "usage: $0 tests|kernels|e2e|e2e-b|more|all [budget_s]" >&2; exit 2 ;;
esac
