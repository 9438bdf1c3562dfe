"""The GPU side without a GPU: the one-call plan (benchmarks/gpu_check.sh --dry-run) and the
whole-model compression benchmark's smoke run, which renders into the GPU report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(**env):
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_dry_run_plan_fits_eight_minutes_and_travels():
    p = _dry_run()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dry run OK" in p.stdout
    total = int(p.stdout.split("total of the time boxes: ")[1].split()[0])
    assert total <= 480
    for step in ("build", "gpu-tests", "kernels", "e2e", "compress", "als", "extras"):
        assert f"\n{step} " in p.stdout
    assert "FAIL" not in p.stdout


def test_dry_run_fails_when_the_boxes_exceed_the_budget():
    p = _dry_run(PGSVD_GPU_BUDGET="300")
    assert p.returncode != 0 and "time boxes exceed the budget" in p.stdout


def test_compress_benchmark_smoke_renders_into_the_report(tmp_path):
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "benchmarks/bench_compress.py", "--smoke", "--device", "cpu",
                    "--out", str(raw)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (res_file,) = raw.glob("*-compress-smoke.json")
    res = json.loads(res_file.read_text())
    assert res["timings"]["device"] == "cpu" and res["timings"]["total_s"] > 0
    assert 0.39 <= res["achieved_ratio"] < 0.6
    subprocess.run([sys.executable, "benchmarks/report.py", str(raw), "--out", str(tmp_path),
                    "--no-plots"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    (md,) = tmp_path.glob("cpu-*.md")
    assert "## Whole-model compression" in md.read_text()
