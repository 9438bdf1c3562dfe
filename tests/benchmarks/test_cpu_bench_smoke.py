"""The CPU benchmarks (kernel table, end to end with checkpoints) run in smoke mode and write
their JSON + markdown; the e2e bytes-per-token rule counts a tied head once."""

from __future__ import annotations

import json

import torch

from tests.benchmarks import load_bench
from tests.conftest import tiny_model


def test_cpu_kernels_smoke(tmp_path):
    rep = load_bench("bench_cpu_kernels").main(["--smoke", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith("-kernels.json"), files
    assert json.loads((tmp_path / files[0]).read_text())["meta"]["complete"] is True
    provs = {(r["dtype"], r["M"], r["provider"]) for r in rep["rows"]}
    assert len(provs) == 2 * 2 * 3  # fp32/bf16 x M 1/17 x op/two_matmul/dense
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rep["rows"])


def test_cpu_e2e_smoke(tmp_path):
    rep = load_bench("bench_cpu_e2e").main(["--smoke", "--out", str(tmp_path), "--dtypes",
                                            "fp32"])
    dense, low = rep["results"]["fp32"]
    assert dense["variant"] == "dense" and low["bytes_per_token"] < dense["bytes_per_token"]
    modes = {(d["mode"], d["batch"]) for d in low["decode"]}
    assert modes == {("hf", 1), ("static", 1), ("static", 2)}
    assert all(d["tokens_per_s"] > 0 for d in low["decode"]) and low["prefill"]["ms"] > 0
    assert "frac ideal" in (tmp_path / next(p.name for p in tmp_path.iterdir()
                                            if p.suffix == ".md")).read_text()


def test_bytes_per_token_counts_the_head_not_the_embedding():
    e2e = load_bench("bench_cpu_e2e")
    model = tiny_model("llama")  # tied embeddings: the head is the embedding matrix
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert e2e.bytes_per_token(model) == total
    untied = tiny_model("llama", tie_word_embeddings=False)
    emb = untied.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in untied.parameters())
    assert e2e.bytes_per_token(untied) == total - emb.numel() * emb.element_size()
    assert isinstance(emb, torch.Tensor)
