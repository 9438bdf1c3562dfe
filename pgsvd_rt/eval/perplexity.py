"""Perplexity over fixed, non-overlapping windows of a token stream.

Window i holds tokens ``[i L, (i + 1) L)``; every token but the first of a window is scored, so
``windows × (L − 1)`` tokens are scored in all (reported). This is the usual protocol of the
compression papers (stride = window length, no overlap).

For a model whose tokenizer adds BOS (``bos_id``, from :func:`pgsvd_rt.data.bos_id`), each
window is BOS followed by ``L − 1`` stream tokens, all of them scored: still ``L − 1`` scored
tokens per window, each window read as the model was trained to read a document. The result
records the convention (``bos``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pgsvd_rt.data import tokens_needed, windows_with_bos

#: Bytes of fp32 logits per forward: windows per forward are cut to fit, as a window's logits
#: (and the loss's two copies of them) dominate memory where the vocabulary is large (Qwen2.5's
#: 151,936 tokens at 2048 tokens a window: 1.2 GB each).
LOGITS_BUDGET = 2 << 30


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    bos_id: int | None = None,
) -> dict:
    """Perplexity of ``model`` on ``ids``.

    Args:
        model: a causal LM returning ``.logits``.
        ids: (T,) int64 token stream.
        seq_len: window length L (>= 2).
        windows: number of windows (None: all complete windows).
        batch_size: windows per forward (at most; fewer where their logits would exceed
            :data:`LOGITS_BUDGET`).
        bos_id: start every window with this token (None: plain windows).

    Returns:
        {"ppl", "nll" (mean per token), "tokens_scored", "windows", "seq_len", "bos"}.

    Raises:
        ValueError: bad seq_len/windows, or a stream shorter than the windows asked for.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if windows is not None and (not isinstance(windows, int) or windows < 1):
        raise ValueError(f"windows must be a positive int, got {windows!r}")
    available = ids.numel() // tokens_needed(1, seq_len, bos_id)
    if available == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seq_len "
                         f"{seq_len}")
    if windows is None:
        windows = available
    if windows > available:
        raise ValueError(f"text has {ids.numel()} tokens: only {available} windows of {seq_len}, "
                         f"asked for {windows}")
    device = next(model.parameters()).device
    vocab = _vocab(model)
    if vocab:
        batch_size = max(1, min(batch_size, LOGITS_BUDGET // (4 * seq_len * vocab)))
    chunks = windows_with_bos(ids, windows, seq_len, bos_id)
    total_nll, scored = 0.0, 0
    for i in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress):
        batch = chunks[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                              reduction="sum")
        if not math.isfinite(float(nll)):
            raise ValueError(f"the model's loss is not finite on windows {i}-"
                             f"{i + len(batch) - 1}: its logits overflow or are NaN")
        total_nll += float(nll)
        scored += batch[:, 1:].numel()
    mean = total_nll / scored
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": scored, "windows": windows,
            "seq_len": seq_len, "bos": bos_id is not None}


def _vocab(model: nn.Module) -> int | None:
    """The width of the model's logits, where it says (its output embedding, or its config)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)
