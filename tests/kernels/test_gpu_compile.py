"""The fused kernel's GPU autotune configs, compiled for sm_90 and sm_80 without a GPU.

CPU CI cannot run the compiled kernel, but it can compile it: benchmarks/kernel_resources.py
drives Triton's ahead-of-time compiler down to cubins and reads their resources. This test holds
every config to the policy written there (compiles, software-pipelined, and on sm_90 at aligned
bf16/fp16 shapes within H100 shared memory and without register spills), so a config or kernel
change that would only fail, or crawl, on a GPU fails here first.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

TOOL = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_resources.py"


@pytest.mark.slow  # ~1 min of compiling on 2 cores; the GPU session's quick runs skip it
def test_gpu_configs_compile_within_resources():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--arch", "90", "80", "--dtypes", "bf16", "fp16",
         "--groups", "1", "--alignment", "aligned", "--check"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode == 3:  # EXIT_UNAVAILABLE: no NVIDIA backend or cuobjdump in this Triton
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, (
        f"policy violations or crash:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert proc.stdout.count("| sm_90 |") == proc.stdout.count("| sm_80 |") > 0
