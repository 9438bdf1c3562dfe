"""benchmarks/bench_layers.py on a tiny factored checkpoint: every provider times every layer kind
of the step, merged as vLLM merges them, and the table and JSON are written."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_bench
from tests.integrations.conftest import factored_tiny


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layers_bench_smoke(tmp_path, dtype):
    ckpt = factored_tiny("llama", tmp_path / "ckpt", dense=())
    res = load_bench("bench_layers").main(["--ckpt", str(ckpt), "--dtype", dtype, "--m", "1", "3",
                                           "--rounds", "3", "--warmup", "1",
                                           "--out", str(tmp_path / "out")])
    # Merged where all members are factored; a block where PGSVD kept one dense (past break-even)
    # runs its factored projections one by one, as the vLLM method does.
    kinds = set(res["bytes"])
    assert {"qkv", "gate/up", "o", "down"} <= kinds <= {"qkv", "gate/up", "o", "down", "q_proj",
                                                         "k_proj", "v_proj", "gate_proj",
                                                         "up_proj"}
    for kind, b in res["bytes"].items():
        assert 0 < b["op"] < b["dense"], kind  # ratio 0.3: factors smaller than the dense layers
    assert set(res["results"]) == {"1", "3"}
    for per in res["results"].values():
        assert {"op", "two-matmul", "dense"} <= set(per)
        assert all(ms > 0 for t in per.values() for ms in t.values())
    (js,) = (tmp_path / "out").glob("*-layers-ckpt-*.json")
    assert json.loads(js.read_text())["meta"]["layers"] == res["meta"]["layers"] > 0
    md = js.with_suffix(".md").read_text()
    assert "dense / op" in md and "command: `python benchmarks/bench_layers.py --ckpt " in md


def test_layers_bench_refuses_rounds_not_above_warmup(tmp_path):
    with pytest.raises(SystemExit):
        load_bench("bench_layers").main(["--ckpt", str(tmp_path), "--rounds", "2", "--warmup",
                                         "3"])
