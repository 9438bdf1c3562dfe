"""The benchmark script runs end to end (CPU: --smoke, tiny shapes) and writes JSON + markdown."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    script = os.path.join(ROOT, "benchmarks", "bench_lowrank_matmul.py")
    proc = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jsons = list(tmp_path.glob("*.json"))
    assert len(jsons) == 1 and jsons[0].with_suffix(".md").exists()
    res = json.loads(jsons[0].read_text())
    providers = {r["provider"] for r in res["rows"]}
    assert {"fused", "two_matmul", "dense", "grouped", "separate"} <= providers
    assert all(r["ms_median"] > 0 and r["GBps"] > 0 for r in res["rows"])
