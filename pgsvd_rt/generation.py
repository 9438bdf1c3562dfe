"""Greedy decoding for serving a (factored) Hugging Face model without per-token Python overhead.

Three modes, measured against each other by ``benchmarks/bench_e2e.py`` (``--decode-modes``):

- ``"hf"``: ``model.generate`` (dynamic cache, eager, under ``torch.no_grad``).
- ``"static"``: a greedy loop over a transformers ``StaticCache`` under ``torch.inference_mode``
  (no autograd dispatch for any op, ours included), eager.
- ``"compile"``: the same loop with the one-token decode step ``torch.compile``-d (the op
  ``pgsvd::lowrank_matmul`` has a fake kernel, so it stays one call inside the graph; on CUDA
  ``mode="reduce-overhead"``, i.e. a CUDA graph). Compiled once per (batch, cache length); the
  first call pays the compilation (tens of seconds on a 2-core CPU).

The default is ``"static"``: on the CPU it measured fastest for a one-shot generation
(``compile`` decodes faster per token but its first call costs 45-55 s of compilation, repaid
only after thousands of tokens; docs/history.md, the CPU end-to-end figures of 2026-12-03).
Servers that generate for long should pick ``"compile"``, or serve through vLLM.

Batches are rectangular: every prompt of a batch has the same length (no padding). Greedy
tokens are those of ``model.generate(do_sample=False)`` with the same cache length (tested).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("pgsvd_rt")

MODES = ("hf", "static", "compile")
DEFAULT_MODE = "static"


class StaticGreedy:
    """Greedy decoding of batches of ``batch`` prompts over a static KV cache of ``max_len``.

    Args:
        model: a causal LM (``model(input_ids, past_key_values=, cache_position=)``).
        max_len: prompt + new tokens, the static cache length.
        compile: ``torch.compile`` the decode step (see module docstring).
    """

    def __init__(self, model: nn.Module, max_len: int, compile: bool = False) -> None:
        from transformers import StaticCache

        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"StaticGreedy: max_len must be an int >= 2, got {max_len!r}")
        self.model, self.max_len = model, max_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.positions = torch.arange(max_len, device=self.device)
        self.compiled = compile
        step = self._step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            step = torch.compile(step, mode=mode, dynamic=False)
        self.step = step

    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tok, past_key_values=self.cache, cache_position=pos,
                         use_cache=True)
        return out.logits[:, -1, :].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation: (B, P) prompt ids -> (B, T) new ids, T <= max_new_tokens.

        Stops early once every sequence has produced ``eos_token_id`` (later tokens of a
        finished sequence are then ``eos_token_id``, like ``generate``'s padding with it).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, length >= 1), got "
                             f"{tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        P = input_ids.shape[1]
        if P + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {P} + max_new_tokens {max_new_tokens} exceeds the cache "
                             f"length max_len={self.max_len}")
        ids = input_ids.to(self.device)
        self.cache.reset()
        out = self.model(input_ids=ids, past_key_values=self.cache,
                         cache_position=self.positions[:P], use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1, :].argmax(-1, keepdim=True)
        done = None if eos_token_id is None else tok.eq(eos_token_id)
        gen = [tok]
        for i in range(P, P + max_new_tokens - 1):
            if done is not None and bool(done.all()):
                break
            if self.compiled and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            tok = self.step(tok, self.positions[i:i + 1]).clone()
            if done is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done = done | tok.eq(eos_token_id)
            gen.append(tok)
        return torch.cat(gen, dim=1)


def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    mode: str = DEFAULT_MODE, eos_token_id: int | None = None) -> torch.Tensor:
    """One greedy generation in ``mode`` (one of :data:`MODES`); (B, T) new token ids."""
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
    if mode == "hf":
        ids = input_ids.to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=eos_token_id if eos_token_id is not None else 0,
                                 eos_token_id=eos_token_id)
        return out[:, ids.shape[1]:]
    dec = StaticGreedy(model, input_ids.shape[1] + max_new_tokens, compile=mode == "compile")
    return dec.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id)
