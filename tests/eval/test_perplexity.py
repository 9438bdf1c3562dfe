import math

import pytest
import torch
import torch.nn.functional as F

from pgsvd_rt.eval import perplexity


def test_matches_manual_cross_entropy(llama):
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    out = perplexity(llama, ids, seq_len=16, windows=5, batch_size=2)
    assert out["tokens_scored"] == 5 * 15 and out["windows"] == 5
    nll = []
    with torch.no_grad():
        for w in ids[:80].view(5, 16):
            logits = llama(w[None]).logits[0, :-1]
            nll.append(F.cross_entropy(logits, w[1:], reduction="sum"))
    ref = float(sum(nll)) / 75
    assert math.isclose(out["nll"], ref, rel_tol=1e-5)
    assert math.isclose(out["ppl"], math.exp(ref), rel_tol=1e-5)


def test_all_windows_by_default(llama):
    out = perplexity(llama, torch.zeros(50, dtype=torch.long), seq_len=16)
    assert out["windows"] == 3


@pytest.mark.parametrize("kw, match", [
    ({"seq_len": 1}, "seq_len"),
    ({"windows": 0}, "windows"),
    ({"windows": 4}, "only 3 windows"),
])
def test_bad_arguments(llama, kw, match):
    with pytest.raises(ValueError, match=match):
        perplexity(llama, torch.zeros(50, dtype=torch.long), **{"seq_len": 16, **kw})


def test_bos_windows_match_manual_cross_entropy(llama):
    """With a BOS, window i is BOS + stream tokens [15 i, 15 (i + 1)), all 15 of them scored."""
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    out = perplexity(llama, ids, seq_len=16, windows=5, batch_size=2, bos_id=257)
    assert out["tokens_scored"] == 5 * 15 and out["bos"] is True
    nll = []
    with torch.no_grad():
        for w in ids[:75].view(5, 15):
            w = torch.cat([torch.tensor([257]), w])
            logits = llama(w[None]).logits[0, :-1]
            nll.append(F.cross_entropy(logits, w[1:], reduction="sum"))
    assert math.isclose(out["nll"], float(sum(nll)) / 75, rel_tol=1e-5)
    assert perplexity(llama, ids, seq_len=16, windows=5)["bos"] is False
    # 50 tokens hold 3 plain windows of 16 but 3 BOS windows of 15 + 1 as well; 44 hold 2.
    with pytest.raises(ValueError, match="only 2 windows"):
        perplexity(llama, ids[:44], seq_len=16, windows=3, bos_id=257)


def test_logits_budget_cuts_the_windows_per_forward(llama, monkeypatch):
    """Windows per forward shrink so their logits fit LOGITS_BUDGET (a large vocabulary at long
    windows): the same perplexity, fewer windows in each forward."""
    import importlib

    mod = importlib.import_module("pgsvd_rt.eval.perplexity")  # the package re-exports the fn

    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(3))
    want = perplexity(llama, ids, seq_len=16, windows=6, batch_size=6)
    seen = []
    handle = llama.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
    vocab = llama.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(mod, "LOGITS_BUDGET", 2 * 4 * 16 * vocab)  # two windows' logits
    try:
        got = perplexity(llama, ids, seq_len=16, windows=6, batch_size=6)
    finally:
        handle.remove()
    assert seen == [2, 2, 2]
    assert math.isclose(got["ppl"], want["ppl"], rel_tol=1e-5)
