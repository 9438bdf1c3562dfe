"""benchmarks/bench_int8.py --smoke: every variant (dense, torchao int8/int4, PGSVD in bf16 and
with int8 factors) is built, scored and timed, and the table is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_int8_bench_smoke(tmp_path):
    pytest.importorskip("torchao", reason="torchao is the peer (make bench-deps installs it)")
    subprocess.run([sys.executable, "benchmarks/bench_int8.py", "--smoke", "--out",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    (js,) = tmp_path.glob("cpu-*-int8-smoke.json")
    rows = json.loads(js.read_text())["rows"]
    assert set(rows) == {"dense", "torchao-int8", "torchao-int4", "pgsvd-20+int8", "pgsvd-60",
                         "pgsvd-40+int8", "pgsvd-70"}
    assert rows["dense"]["bytes_vs_dense"] == 1.0
    assert rows["pgsvd-40+int8"]["bytes_vs_dense"] < rows["pgsvd-20+int8"]["bytes_vs_dense"] < 1
    for name, r in rows.items():
        assert r["ppl"] > 1 and r["tok_s_static"] > 0, name
    assert 0 <= rows["pgsvd-40+int8"]["int8_rel_error_max"] < 0.05
    assert "| pgsvd-40+int8 |" in js.with_suffix(".md").read_text()


def test_int8_bench_heal_variant_smoke(tmp_path):
    """A healed variant (``pgsvd-P~healS``) keeps its twin's bytes, is not timed again, and the
    table reports its heal; torchao is not needed for it. The twin is compressed once and healed
    as a copy: the zero-shot row stays zero-shot."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_int8.py", "--smoke", "--out",
                           str(tmp_path), "--variants", "dense", "pgsvd-40", "pgsvd-40~heal3",
                           "--tag", "heal"],
                          cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    (js,) = tmp_path.glob("cpu-*-int8-smoke-heal.json")
    rows = json.loads(js.read_text())["rows"]
    healed, twin = rows["pgsvd-40~heal3"], rows["pgsvd-40"]
    assert healed["bytes_vs_dense"] == twin["bytes_vs_dense"] < 1
    assert healed["heal_s_per_step"] > 0 and "tok_s_static" not in healed
    assert twin["tok_s_static"] > 0 and healed["ppl"] > 1
    assert "| pgsvd-40~heal3 |" in js.with_suffix(".md").read_text()
    assert proc.stderr.count("achieved compression") == 1, proc.stderr
    assert healed["ppl"] != twin["ppl"]
