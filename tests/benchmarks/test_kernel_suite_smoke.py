"""The pytest-benchmark kernel suite runs in smoke mode on CPU, and report.py renders its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.benchmarks import load_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def test_kernel_suite_smoke_and_report(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    env = dict(os.environ, PGSVD_BENCH_SCOPE="smoke", PYTHONPATH=ROOT)
    env.setdefault("TRITON_INTERPRET", "1")
    # Smoke scope: one tiny shape, 3 rounds each (timed, so the report has numbers to render).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           os.path.join(BENCH, "test_kernels_bench.py"),
           f"--benchmark-json={raw}/kernels-bench.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 passed" in proc.stdout, proc.stdout[-2000:]
    pb = json.loads((raw / "kernels-bench.json").read_text())
    assert pb["machine_info"]["pgsvd"]["device"].startswith("CPU")
    assert {b["extra_info"]["provider"] for b in pb["benchmarks"]} == {
        "fused", "two_matmul", "dense"}

    out = load_bench("report").main([str(raw), "--out", str(tmp_path), "--no-plots"])
    assert len(out["kernels"]) == 6
    for r in out["kernels"]:
        assert r["ms_median"] > 0 and r["GBps"] > 0 and r["speedup_vs_dense"] > 0, r
    md = next(tmp_path.glob("cpu-*.md")).read_text()
    assert "Kernel suite" in md and "two_matmul" in md
