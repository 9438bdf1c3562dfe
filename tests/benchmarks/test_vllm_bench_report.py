"""benchmarks/bench_vllm.py's report (no vLLM needed): the paired ratio is taken round by round,
the fraction of the ideal from it, and --render rewrites a saved report's markdown."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_bench


def _report() -> dict:
    def row(name, nbytes, rounds):
        return {"name": name, "dir": name, "tp_reduce": "output", "bytes_per_token": nbytes,
                "tok_s": {"1": sorted(rounds)[len(rounds) // 2]}, "rounds": {"1": rounds}}

    # Round 2 is slow for both (load on the machine): the paired ratio is 1.5 in every round.
    return {"meta": {"device": "CPU: test", "date": "2026-12-03", "model": "tiny",
                     "vllm": "0", "compile": False, "tp": 1, "prompt": 4, "new_tokens": 4,
                     "rounds": 3, "concurrency": [1]},
            "results": {"bfloat16": [row("dense", 300, [30.0, 20.0, 40.0]),
                                     row("pgsvd-40", 200, [45.0, 30.0, 60.0])]}}


def test_paired_ratio_pairs_rounds():
    bench = load_bench("bench_vllm")
    rep = _report()
    dense, fact = rep["results"]["bfloat16"]
    assert bench.paired(fact, dense, 1) == pytest.approx((1.5, 1.5, 1.5))
    md = bench.to_markdown(rep)
    row = next(line for line in md.splitlines() if line.startswith("| pgsvd-40"))
    # ideal 300 / 200 = 1.5; paired 1.5, frac 1.00; no profile in the report: no bound.
    assert "| 1.50x (1.50-1.50) | 1.50x | 1.00 | - | - |" in row


def test_render_rewrites_markdown(tmp_path):
    bench = load_bench("bench_vllm")
    rep = _report()
    # Ratios 2, 1, 1.125 round by round: paired 1.125, while the medians (45 / 30) give 1.5.
    rep["results"]["bfloat16"][1]["rounds"]["1"] = [60.0, 20.0, 45.0]
    js = tmp_path / "r.json"
    js.write_text(json.dumps(rep))
    assert bench.main(["--render", str(js)]) is None
    md = (tmp_path / "r.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| pgsvd-40"))
    assert "| 1.12x (1.00-2.00) | 1.50x | 0.75 |" in row  # 1.125 / 1.5


def test_profile_bound_keeps_the_rest_of_the_step():
    """Dense spends 6 of its 10 s in the decoder's linears, which the variant reads 2x fewer of:
    at best 10 / (4 + 3) = 1.43x; the paired 1.4x is 0.98 of that."""
    bench = load_bench("bench_vllm")
    rep = _report()
    dense, fact = rep["results"]["bfloat16"]
    dense["linear_elems"], fact["linear_elems"] = 2000, 1000
    dense["split"] = {"1": {"wall_s": 10.0, "linear_ms": 6000.0, "head_ms": 500.0}}
    fact["rounds"]["1"] = [42.0, 28.0, 56.0]  # paired 1.4 in every round
    assert bench.profile_bound(dense, fact, "1") == pytest.approx(10 / 7)
    row = next(line for line in bench.to_markdown(rep).splitlines()
               if line.startswith("| pgsvd-40"))
    assert row.endswith("| 1.43x | 0.98 |")


def test_out_required_without_render():
    with pytest.raises(SystemExit):
        load_bench("bench_vllm").main([])


def test_server_table_pairs_rounds_and_counts_every_request():
    bench = load_bench("bench_vllm")
    rep = _report()

    def st(tok_s, ok=4, same=4):
        return {"requests": 4, "ok": ok, "failed": [], "tok_s": tok_s, "same_as_offline": same,
                "ttft_ms": {"p50": 10.0, "p99": 20.0}, "itl_ms": {"p50": 1.0, "p99": 2.0},
                "itl_n": 1, "itl_top_ms": [2.0]}

    rep["meta"]["server_clients"] = [4]
    rep["server"] = {"bfloat16": {"dense": {"4": [st(10.0), st(20.0)]},
                                  "pgsvd-40": {"4": [st(15.0, ok=3, same=2), st(30.0)]}}}
    md = bench.to_markdown(rep)
    row = next(line for line in md.splitlines() if line.startswith("| pgsvd-40 | 4 |"))
    # paired: 1.5 in both rounds; ok 7 of 8 requests, 6 of the 7 as offline.
    assert "| 1.50x |" in row and "| 7/8 | 6/7 |" in row


def test_summary_one_row_per_variant_with_server_cells(tmp_path, capsys):
    """--summary (the README's speed table): paired speedup and its fraction of the ideal per
    load, '-' for loads the report lacks, the server's paired tok/s and p99 ITL over dense."""
    bench = load_bench("bench_vllm")
    rep = _report()

    def st(tok_s, p99):
        return {"requests": 4, "ok": 4, "failed": [], "tok_s": tok_s, "same_as_offline": 4,
                "ttft_ms": {"p50": 10.0, "p99": 20.0}, "itl_ms": {"p50": 1.0, "p99": p99},
                "itl_n": 1, "itl_top_ms": [p99]}

    rep["meta"]["server_clients"] = [16]
    rep["server"] = {"bfloat16": {"dense": {"16": [st(10.0, 4.0)]},
                                  "pgsvd-40": {"16": [st(12.0, 3.0)]}}}
    js = tmp_path / "r.json"
    js.write_text(json.dumps(rep))
    assert bench.main(["--summary", str(js)]) is None
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| test")]
    head = "| test, 2026-12-03 | tiny | pgsvd-40 | bfloat16 | eager | "
    assert rows == [head + "1.50x (1.00) | - | - | - |", head + "1.20x / 0.75 | - |"]
