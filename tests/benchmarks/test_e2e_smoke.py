"""bench_e2e.py --smoke: a tiny random LLaMA, dense vs factored, prefill + decode, JSON + md."""

from __future__ import annotations

import json
import os

from tests.benchmarks import load_bench

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def test_e2e_smoke(tmp_path):
    rep = load_bench("bench_e2e").main(["--smoke", "--out", str(tmp_path), "--threads", "1",
                                   "--variants", "dense", "pgsvd-40"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith("e2e-smoke.json"), files
    on_disk = json.loads((tmp_path / files[0]).read_text())
    assert [v["variant"] for v in on_disk["variants"]] == ["dense", "pgsvd-40"]
    dense, pg = rep["variants"]
    assert dense["achieved_ratio"] == 0.0 and 0.0 < pg["achieved_ratio"] < 1.0
    assert pg["linear_param_bytes"] < dense["linear_param_bytes"]
    for v in rep["variants"]:
        assert v["prefill"][0]["ms_median"] > 0
        assert v["decode"][0]["tokens_per_s"] > 0 and v["decode"][0]["mode"] == "eager"


def test_rank_rounding_keeps_dense_layers():
    e2e = load_bench("bench_e2e")
    r = e2e.load_ranks("llama2-7b", "pgsvd-40", 64)
    raw = e2e.load_ranks("llama2-7b", "pgsvd-40", 1)
    assert set(r) == {"q", "k", "v", "o", "gate", "up", "down"} and len(r["q"]) == 32
    for p in r:
        for a, b in zip(r[p], raw[p], strict=True):
            assert (a is None) == (b is None)
            assert a is None or (a % 64 == 0 and abs(a - b) <= 32)


def test_decode_loop_matches_generate():
    """The timed static-cache loop decodes the same greedy tokens as HF generate."""
    import torch

    e2e = load_bench("bench_e2e")
    # Seeded: on a random tiny model greedy decoding meets near-ties, where HF generate's own
    # numerics and ours can pick different tokens (1 seed in 30 did, unseeded this test flaked).
    torch.manual_seed(0)
    model, _ = e2e.build_dense("smoke", "cpu", torch.float32)
    run = e2e._decode_loop(model, 2, 6, "cpu", compiled=False)
    with torch.no_grad():
        run()
        ref = model.generate(run.prompt, attention_mask=torch.ones_like(run.prompt),
                             max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        # The definition of greedy decoding: each token is the argmax of a cache-free forward.
        full = torch.cat([run.prompt, run.tokens], dim=1)
        logits = model(full).logits[:, run.prompt.shape[1] - 1:-1]
    assert torch.equal(run.tokens, logits.argmax(-1))
    assert torch.equal(run.tokens, ref[:, run.prompt.shape[1]:])
