"""Shape tables, committed rank profiles, and the `pgsvd bench` plumbing (no benchmark runs)."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCH)
import benchlib  # noqa: E402


def test_command_is_what_a_user_types_from_the_repository_root():
    script = os.path.join(BENCH, "bench_vllm.py")
    assert (benchlib.command(script, ["--model", "smollm2-135m", "--note", "Zen 4, 2 cores"])
            == "python benchmarks/bench_vllm.py --model smollm2-135m --note 'Zen 4, 2 cores'")
    assert benchlib.command("/elsewhere/x.py", []) == "python /elsewhere/x.py"


def test_shapes_from_configs():
    assert benchlib.shape_groups("llama2-7b") == [
        ("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)]
    # Llama-3-8B's GQA k/v (8 kv heads of 128) and MLP equal Mistral-7B's: one shape, two labels
    shapes = benchlib.kernel_shapes(["mistral-7b", "llama3-8b"])
    assert ("mistral-7b:k/v+llama3-8b:k/v", 1024, 4096) in shapes and len(shapes) == 4
    assert len(benchlib.kernel_shapes(list(benchlib.MODELS))) == 13
    smol = benchlib.block_linears("smollm2-135m")
    assert [(p, N, K) for p, N, K in smol if p == "k"] == [("k", 192, 576)]
    assert benchlib.rank_for(0.4, 4096, 4096) == 819


@pytest.mark.parametrize("model", ["smollm2-135m", "llama2-7b"])
def test_committed_profiles_meet_budgets(model):
    with open(os.path.join(BENCH, "profiles", f"{model}.json")) as f:
        prof = json.load(f)
    blocks = benchlib.MODELS[model]["layers"]
    dense = sum(N * K for N, K in prof["shapes"].values()) * blocks
    for name, p in prof["profiles"].items():
        stored = sum(N * K if r is None else r * (N + K)
                     for proj, (N, K) in prof["shapes"].items() for r in p["ranks"][proj])
        assert len(p["ranks"]["q"]) == blocks
        assert abs((1 - stored / dense) - p["achieved_ratio"]) < 1e-9
        assert p["achieved_ratio"] >= p["target_ratio"] - 1e-9, name
        if p["method"] == "pgsvd":
            assert p["distinct_ranks"] > 10  # heterogeneous, from real spectra


def test_bench_cli_parts_and_errors(tmp_path):
    from pgsvd_rt import bench, cli

    args = cli.build_parser().parse_args(["bench", "--smoke", "--parts", "kernels"])
    assert args.command == "bench" and args.parts == ["kernels"] and args.smoke
    with pytest.raises(ValueError, match="unknown benchmark part"):
        bench.run_suite(tmp_path, parts=("nope",))
    steps = bench._steps(bench.benchmarks_dir(), tmp_path, gpu=True, smoke=False,
                         parts=bench.PARTS)
    names = [s[0] for s in steps]
    assert names == ["kernel suite", "microbench", "e2e", "als"]
    assert "llama2-7b" in steps[2][1] and "cuda" in steps[3][1]
