#!/usr/bin/env bash
# The GPU check: ONE device call that answers every open GPU question, in order of importance.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (the device tool's `run`)
#   bash benchmarks/gpu_check.sh --dry-run  # here, on the CPU: the plan, its time boxes, and a
#                                           # check that everything it needs travels
#
# Total wall budget: 480 s (8 minutes; the lease is 15 minutes, the machine's start included).
# Every step has a time box (`timeout`, capped by what is left of the budget); a step that fails
# or runs out is recorded and the next one runs. After every step the results so far are packed
# into $OUT/gpu-check.tar.gz (raw JSON, logs, junit XML, steps.txt), so a cut-off keeps what ran.
# Nothing is fetched from a network: what the image lacks comes from .whl/
# (benchmarks/fetch_gpu_wheels.sh, carried along). The 7B-shaped models are built from configs
# with random weights there (latency does not depend on values); the pgsvd ranks travel as
# benchmarks/profiles/llama2-7b.json. The policy step measures which CUDA path (fused Triton or
# two cuBLAS GEMMs) serves each M bucket and writes the table pgsvd_rt/ops/cuda_policy.py reads:
# the steps after it run on that table (PGSVD_CUDA_POLICY), and a copy ready to commit comes back
# as $OUT/cuda_policy.json beside the tarball. Here, benchmarks/collect_gpu.sh renders the
# tarball into benchmarks/results/<gpu>-<date>.* and merges the table into the committed one.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${PGSVD_GPU_BUDGET:-480}
CARRY_LIMIT_MIB=64
OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}

# name | time box (s) | command (words; $RAW and $W expand at run time) | what it answers
PLAN=(
  "deps|10|deps|versions, GPU name; wheels from .whl/ for what the image lacks"
  "build|70|$PY -m pip install --no-build-isolation --no-deps -e .|pgsvd_rt._C as a CUDA extension (CUDA ALS)"
  "gpu-tests|60|$PY -m pytest -q -p no:cacheprovider -m gpu tests --junitxml=\$W/junit-gpu.xml|kernels bf16/fp16 vs fp64 (the 2x rule), opcheck, torch.compile(fullgraph), CUDA-graph replay = eager, grouped op, both CUDA paths (fused, cuBLAS), CUDA ALS vs reference"
  "kernels|40|$PY benchmarks/bench_lowrank_matmul.py --out \$RAW --kappas 0.6 0.4 --dtypes bf16|LLaMA-2-7B shapes, M 1/16/4096, kappa 0.6/0.4, bf16: fused vs two matmuls vs dense, CUDA-graph and fused_pad16 rows, GB/s vs a copy bandwidth measured in the same run"
  "policy|50|$PY benchmarks/bench_lowrank_matmul.py --out \$RAW --policy \$W/cuda_policy.json --kappas 0.6 0.4 --dtypes bf16|CUDA path table: the op fused vs two cuBLAS GEMMs per M bucket 1..4096 (CUDA graphs up to 256), LLaMA-2-7B shapes, kappa 0.6/0.4, bf16; later steps run on it"
  "e2e|160|$PY benchmarks/bench_e2e.py --model llama2-7b --out \$RAW --variants dense pgsvd-40 --batches 1 --prompts 1024 --new-tokens 64 --reps 3 --rank-multiple 128|7B-shaped bf16: dense vs pgsvd-40 decode tokens/s at batch 1 under CUDA graphs, prefill 1024"
  "compress|70|$PY benchmarks/bench_compress.py --model llama2-7b --device cuda --out \$RAW --samples 32 --seq-len 512 --blocks-per-pass 8|whole 7B-shaped PGSVD compression on the GPU (goal <= 120 s), peak memory"
  "als|15|$PY benchmarks/bench_als.py --device cuda --out \$RAW --no-build --layers 8 --repeats 1|batched CUDA ALS vs the per-layer torch loop (goal >= 10x)"
  "extras|0|$PY benchmarks/bench_e2e.py --model llama2-7b --out \$RAW --tag extras --variants pgsvd-40-pad16 pgsvd-20 --batches 1 16 --prompts 1024 --new-tokens 32 --reps 2 --rank-multiple 128|whatever fits: pgsvd-40 padded to 16k, pgsvd-20, batch 16"
)
# extras' box 0 = all that is left of the budget.

field() { echo "$1" | cut -d'|' -f"$2"; }

dry_run() {
  local total=0 ok=1 line name box cmd script flag help
  printf '%-10s %6s  %s\n' step box_s "what it answers"
  for line in "${PLAN[@]}"; do
    name=$(field "$line" 1); box=$(field "$line" 2); cmd=$(field "$line" 3)
    total=$((total + box))
    printf '%-10s %6s  %s\n' "$name" "$([ "$box" = 0 ] && echo rest || echo "$box")" \
      "$(field "$line" 4)"
    printf '%-10s %6s  $ %s\n' "" "" "$cmd"
    # Every script it calls is in the tree and accepts every flag it is given.
    script=$(echo "$cmd" | grep -o 'benchmarks/[a-z_]*\.py' | head -n 1)
    if [ -n "$script" ]; then
      if ! help=$($PY "$script" --help 2>&1); then
        echo "  FAIL: $script --help does not run"; ok=0
      fi
      for flag in $(echo "$cmd" | grep -o -- '--[a-z][a-z0-9-]*'); do
        echo "$help" | grep -q -- "$flag" || { echo "  FAIL: $script has no flag $flag"; ok=0; }
      done
    fi
  done
  echo "total of the time boxes: ${total} s + extras = the budget ${BUDGET} s"
  [ "$total" -le "$BUDGET" ] || { echo "FAIL: time boxes exceed the budget"; ok=0; }
  [ "$BUDGET" -le 480 ] || { echo "FAIL: budget over 8 minutes"; ok=0; }
  # What travels: the git tree (the device tool carries the checkout) and .whl/ if fetched.
  local tree whl
  tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
  whl=$(du -sb .whl 2>/dev/null | cut -f1); whl=${whl:-0}
  echo "carry: tree $((tree / 1024)) KiB + .whl/ $((whl / 1024)) KiB (limit ${CARRY_LIMIT_MIB} MiB)"
  [ $((tree + whl)) -le $((CARRY_LIMIT_MIB * 1024 * 1024)) ] || { echo "FAIL: carry over limit"; ok=0; }
  for f in benchmarks/profiles/llama2-7b.json benchmarks/collect_gpu.sh benchmarks/report.py; do
    git ls-files --error-unmatch "$f" >/dev/null 2>&1 || { echo "FAIL: $f is not in the tree"; ok=0; }
  done
  $PY -c 'from pgsvd_rt.ops import cuda_policy as p; p.load(p.TABLE_PATH)' >/dev/null 2>&1 \
    || { echo "FAIL: pgsvd_rt/ops/cuda_policy.json does not load"; ok=0; }
  local n
  n=$($PY -m pytest -q --collect-only -p no:cacheprovider -m gpu tests 2>/dev/null | grep -c '::')
  echo "GPU tests collected: $n"
  [ "$n" -gt 0 ] || { echo "FAIL: no test is marked gpu"; ok=0; }
  [ "$ok" = 1 ] && echo "dry run OK" || { echo "dry run FAILED"; return 1; }
}

if [ "${1:-}" = --dry-run ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  dry_run
  exit $?
fi

START=$(date +%s)
W=$(mktemp -d /tmp/pgsvd-gpu-XXXXXX)
RAW=$W/raw
STEPS=$W/steps.txt
mkdir -p "$RAW" "$OUT"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
left() { echo $((BUDGET - ($(date +%s) - START))); }

pack() {
  cp "$STEPS" "$OUT/steps.txt"
  tar czf "$OUT/gpu-check.tar.gz" -C "$W" .
}

deps() {  # versions; install from .whl/ whatever does not import
  local miss f files=()
  miss=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("torch", "triton", "transformers", "safetensors", "tokenizers", "accelerate", "tqdm", "numpy", "pytest") if u.find_spec(m) is None))')
  for m in $miss; do
    f=$(ls .whl/"$m"-*.whl 2>/dev/null | head -n 1)
    [ -n "$f" ] && files+=("$f")
  done
  if [ ${#files[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${files[@]}"
  fi
  "$PY" -c 'import torch, triton, transformers; print("versions: torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  return 0
}
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

echo "gpu_check.sh: budget ${BUDGET}s, work dir $W" | tee "$STEPS"
for line in "${PLAN[@]}"; do
  name=$(field "$line" 1); box=$(field "$line" 2); cmd=$(field "$line" 3)
  cap=$(($(left) - 10))  # keep 10 s for the last pack
  if [ "$cap" -lt 10 ]; then
    echo "$name SKIPPED (budget spent)" | tee -a "$STEPS"
    continue
  fi
  if [ "$box" = 0 ] || [ "$box" -gt "$cap" ]; then box=$cap; fi
  cmd=${cmd//\$RAW/$RAW}; cmd=${cmd//\$W/$W}
  t0=$(date +%s)
  if [ "$name" = deps ]; then
    deps >"$W/$name.log" 2>&1; rc=$?
  else
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout -k 5 "$box" $cmd >"$W/$name.log" 2>&1; rc=$?
  fi
  echo "$name rc=$rc $(($(date +%s) - t0))s (box ${box}s)" | tee -a "$STEPS"
  tail -n 3 "$W/$name.log"
  if [ "$name" = build ] && [ "$rc" != 0 ]; then  # the Triton kernels need no native code
    PGSVD_NO_NATIVE=1 timeout 60 "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
      >>"$W/$name.log" 2>&1 && echo "build: fell back to PGSVD_NO_NATIVE=1" | tee -a "$STEPS"
  fi
  if [ "$name" = policy ] && [ -s "$W/cuda_policy.json" ]; then  # a cut-off run writes it too
    cp "$W/cuda_policy.json" "$OUT/cuda_policy.json"
    export PGSVD_CUDA_POLICY=$W/cuda_policy.json
    echo "policy: the steps below run on the measured table (PGSVD_CUDA_POLICY)" | tee -a "$STEPS"
  fi
  pack
done
cat "$W/deps.log" >>"$STEPS" 2>/dev/null
pack
echo "packed $OUT/gpu-check.tar.gz ($(du -h "$OUT/gpu-check.tar.gz" | cut -f1)); $(left)s left"
