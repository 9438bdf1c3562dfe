"""Zero-shot accuracy by log-likelihood, scored as lm-evaluation-harness scores it.

For each (context, continuation) request (see :mod:`pgsvd_rt.eval.tasks`):

- tokens as lm-eval's ``_encode_pair``: trailing spaces of the context move to the
  continuation; ``whole = enc(context + continuation)``, ``ctx = enc(context)``, continuation
  tokens ``= whole[len(ctx):]``; the tokenizer's default special tokens; an empty context is
  replaced by the EOS token; inputs longer than the model's window are cut on the left.
- ``loglik`` = Σ log p(continuation token | prefix); ``is_greedy`` = every continuation token
  is the argmax.

Per item: ``acc`` = 1 when the request with the largest summed loglik is the gold one (first
maximum wins, as ``numpy.argmax``); ``acc_norm`` the same with loglik divided by the choice's
length in characters (lm-eval's ``acc_norm``); LAMBADA ``acc`` = ``is_greedy`` of the target word.

Batching: requests are sorted by length (longest first, so memory peaks at once), left-padded
with explicit position ids, one forward per batch; requests with identical input tokens share
one row (BoolQ's " no"/" yes" after one passage); only the continuation positions go through
the LM head (``logits_to_keep``). Subsets: ``limit`` takes the first N documents of each task
in file order, the same subset as lm-eval's ``--limit``.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pgsvd_rt.data import bos_id
from pgsvd_rt.eval.tasks import Item, get_task, load_items

log = logging.getLogger("pgsvd_rt")

#: The five tasks averaged in the paper-style table (the paper's CommonsenseQA is not shipped).
DEFAULT_TASKS = ("arc_easy", "piqa", "winogrande", "lambada", "hellaswag")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair`` (context tokens, continuation tokens)."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _max_length(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048) or 2048)


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = True,
) -> list[tuple[float, bool]]:
    """``(loglik, is_greedy)`` of each continuation given its context, in request order."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    max_len = _max_length(model)
    encoded = []
    for ctx, cont in requests:
        c_ids, t_ids = encode_pair(tokenizer, ctx, cont)
        if not t_ids:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        full = (c_ids + t_ids)[-(max_len + 1):]
        encoded.append((full[:-1], t_ids))  # the last token is predicted, never an input
    # Requests with the same input tokens (e.g. one-token answers " no"/" yes" after one
    # passage) share one row of the batch: only their targets differ.
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (inp, _) in enumerate(encoded):
        rows.setdefault(tuple(inp), []).append(i)
    keys = sorted(rows, key=lambda k: -len(k))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, bool] | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc="loglikelihood", disable=not progress, unit="req")
    for b in range(0, len(keys), batch_size):
        batch = keys[b : b + batch_size]
        L = max(len(k) for k in batch)
        K = max(len(encoded[i][1]) for k in batch for i in rows[k])
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for r, inp in enumerate(batch):
            ids[r, L - len(inp):] = torch.tensor(inp)
            mask[r, L - len(inp):] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=pos.to(device), logits_to_keep=K, use_cache=False).logits
        logp = F.log_softmax(logits.float(), dim=-1).cpu()  # (B, K, V): last K positions
        for r, inp in enumerate(batch):
            for i in rows[inp]:
                target = torch.tensor(encoded[i][1])
                lp = logp[r, K - target.numel():]
                ll = float(lp.gather(1, target[:, None]).sum())
                out[i] = (ll, bool((lp.argmax(-1) == target).all()))
                bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


def _argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_items(items: list[Item], results: list[tuple[float, bool]]) -> list[dict]:
    """Per-item predictions from the per-request results (flattened in item order)."""
    rows, k = [], 0
    for it in items:
        res = results[k : k + len(it.requests)]
        k += len(it.requests)
        lls = [r[0] for r in res]
        if it.greedy:
            rows.append({"acc": float(res[0][1]), "loglik": lls[0]})
            continue
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, it.choices, strict=True)])
        rows.append({"pred": pred, "pred_norm": pred_norm, "gold": it.gold,
                     "acc": float(pred == it.gold), "acc_norm": float(pred_norm == it.gold),
                     "lls": lls})
    return rows


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    return_items: bool = False,
) -> dict:
    """Zero-shot accuracy of ``model`` on ``tasks``.

    Args:
        model: a causal LM returning ``.logits`` and accepting ``logits_to_keep``.
        tasks: names from :data:`pgsvd_rt.eval.tasks.TASKS`.
        limit: first N documents of each task (None: all).
        batch_size: requests per forward.
        return_items: also return per-item predictions (for cross-checks).

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm"], "n", "wall_s"}},
        "average_acc": mean acc over tasks, "limit": limit, "bos": whether every context
        starts with BOS (the tokenizer's convention, :func:`pgsvd_rt.data.bos_id`)}``
        (+ ``"items"``).
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("no tasks given")
    for t in tasks:
        get_task(t)  # unknown names fail before any work
    was_training = model.training
    model.eval()
    out: dict = {"tasks": {}, "limit": limit, "bos": bos_id(tokenizer) is not None}
    items_out = {}
    try:
        for name in tasks:
            t0 = time.perf_counter()
            items = load_items(name, limit)
            requests = [r for it in items for r in it.requests]
            log.info("%s: %d items, %d requests", name, len(items), len(requests))
            rows = score_items(items, loglikelihoods(model, tokenizer, requests, batch_size,
                                                     progress))
            accs = [r["acc"] for r in rows]
            res = {"acc": sum(accs) / len(accs), "acc_stderr": _stderr(accs), "n": len(rows)}
            if "acc_norm" in get_task(name).metrics:
                res["acc_norm"] = sum(r["acc_norm"] for r in rows) / len(rows)
            res["wall_s"] = time.perf_counter() - t0
            out["tasks"][name] = res
            items_out[name] = rows
    finally:
        model.train(was_training)
    out["average_acc"] = sum(r["acc"] for r in out["tasks"].values()) / len(out["tasks"])
    if return_items:
        out["items"] = items_out
    return out
