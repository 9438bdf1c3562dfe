#!/usr/bin/env bash
# Download (here, where pip reaches a registry) the py3.12 x86-64 wheels that the GPU machine may
# lack, into .whl/ (ignored by git). The next device call carries them: carry [".whl"].
# benchmarks/gpu_check.sh installs from .whl/ only the packages that fail to import there.
#
# On the GPU image (see /work/.library/device/KINDS.md) torch, triton, transformers, tokenizers,
# safetensors, accelerate, tqdm, numpy, pytest, pytest-benchmark, matplotlib, pybind11 and ninja
# are already installed; gguf is not (only GGUF loading needs it: not used by the GPU benchmarks).
# So by default only the small fallbacks are fetched; FULL=1 adds pytest-benchmark and the
# matplotlib stack (~20 MiB) for an image that lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
get() {  # pure-python or manylinux wheels for CPython 3.12, no dependencies resolved
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d .whl "$@"
}
get gguf==0.19.0
if [ "${FULL:-0}" = 1 ]; then
  get pytest-benchmark==5.3.1 py-cpuinfo==9.0.0
  get matplotlib==3.11.2 contourpy cycler fonttools kiwisolver pyparsing python-dateutil \
      pillow six
fi
ls -la .whl
total=$(du -sm .whl | cut -f1)
echo "total ${total} MiB in .whl/ (the device call carries at most 64 MiB with the tree)"
[ "$total" -lt 40 ] || { echo "fetch_gpu_wheels: .whl/ is over 40 MiB" >&2; exit 1; }
