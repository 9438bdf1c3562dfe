#!/usr/bin/env bash
# Merge the tarball(s) that benchmarks/gpu_check.sh left in $OUT (fetched here by the device tool)
# into benchmarks/results/<device>-<date>-raw/ and render <device>-<date>.json/.md/*.png; the
# CUDA path table a policy step measured (raw/*-cuda-policy.json) is merged into the committed
# pgsvd_rt/ops/cuda_policy.json (its device's entry added or replaced: review, then commit).
#   benchmarks/collect_gpu.sh <files_at>/gpu-check.tar.gz
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ $# -gt 0 ] || { echo "usage: $0 gpu-PHASE.tar.gz ..." >&2; exit 2; }
tmp=$(mktemp -d)
mkdir -p "$tmp/raw/logs"
i=0
for t in "$@"; do
  i=$((i + 1))
  mkdir -p "$tmp/x$i"
  tar xzf "$t" -C "$tmp/x$i"
  cp "$tmp/x$i"/raw/* "$tmp/raw/" 2>/dev/null || true
  for f in "$tmp/x$i"/steps.txt "$tmp/x$i"/*.xml "$tmp/x$i"/*.log; do
    [ -f "$f" ] && cp "$f" "$tmp/raw/logs/$(basename "$t" .tar.gz)-$(basename "$f")"
  done
done
stem=$("$PY" benchmarks/report.py "$tmp/raw" --out "$tmp/report" --no-plots | sed -n 's/^wrote \(.*\)\.json,.*/\1/p')
name=$(basename "$stem")
dest=benchmarks/results/$name-raw
mkdir -p "$dest"
cp -r "$tmp/raw/." "$dest/"
"$PY" benchmarks/report.py "$dest" --out benchmarks/results
for f in "$tmp"/raw/*-cuda-policy.json; do  # this run's measurements only
  [ -f "$f" ] || continue
  "$PY" -c 'import sys; from pgsvd_rt.ops import cuda_policy as p; print(", ".join(p.merge_file(sys.argv[1])))' \
    "$dest/$(basename "$f")" | sed 's|^|pgsvd_rt/ops/cuda_policy.json: merged the entry of |'
done
rm -rf "$tmp"
