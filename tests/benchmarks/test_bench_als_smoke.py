"""benchmarks/bench_als.py --smoke runs end to end and writes its JSON + markdown report."""

from __future__ import annotations

import importlib.util
import json
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_als.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_als", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_als_smoke(tmp_path):
    report = _load_bench().main(
        ["--out", str(tmp_path), "--smoke", "--device", "cpu", "--threads", "1"]
    )
    js = sorted(tmp_path.glob("cpu-*-als.json"))
    md = sorted(tmp_path.glob("cpu-*-als.md"))
    assert len(js) == 1 and len(md) == 1, list(tmp_path.iterdir())
    on_disk = json.loads(js[0].read_text())
    assert on_disk["meta"]["device"].startswith("CPU")
    assert on_disk["meta"]["smoke"] is True and on_disk["build"] is None
    assert len(on_disk["results"]) == len(report["results"]) == 8  # 4 shape groups x 2 budgets
    for r in on_disk["results"]:
        assert r["native_s"] > 0 and r["loop_s"] > 0
        # fp64: native and reference agree (on the reference path too, trivially).
        assert r["max_rel_objective_diff"] <= 1e-10, r
    assert "loop/native" in md[0].read_text()


def test_uniform_rank_matches_budget_formula():
    bench = _load_bench()
    assert bench.uniform_rank(576, 576, 0.4) == int(0.6 * 576 * 576 / 1152)
    assert bench.uniform_rank(11008, 4096, 0.4) == 1791
    groups = bench.shape_groups(bench.SMOLLM2_135M)
    assert sum(g[3] for g in groups) == 210  # 30 blocks x 7 linears
