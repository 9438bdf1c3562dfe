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
