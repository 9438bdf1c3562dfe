"""Calibration: Gram matrices ``G = Σ x xᵀ`` of every distinct linear input, in one dense pass.

Layers that read the same tensor (q/k/v of a block; gate/up) share one Gram, so a hook sits on
one representative module per input. The forward runs in the model's dtype (fp32 for the
embedded model); each batch's ``XᵀX`` is a float32 GEMM over at most ``batch_size × seq_len``
tokens and the running sum across batches is kept in float64. Padding tokens (attention mask 0)
are excluded. Only the decoder backbone runs (no lm_head, whose logits would dominate memory).

The sums live on the model's device (the GPU when compressing there). Memory is bounded by
gathering a few blocks at a time (``CalibConfig.blocks_per_pass``): only their Grams exist, the
forward stops after the last of them and the next pass starts from the hidden state it left, so
the dense model runs once over the calibration data whatever the number of passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pgsvd_rt.arch import LinearSpec, backbone_forward, decoder_layers

log = logging.getLogger("pgsvd_rt")


@dataclass
class InputStats:
    """Statistics of one linear input over the calibration tokens.

    Attributes:
        gram: (M, M) float64, ``Σ x xᵀ`` (uncentred).
        abs_sum: (M,) float64, ``Σ |x|`` per channel (ASVD's scaling).
        tokens: number of tokens accumulated.
    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class _StopForward(Exception):
    """Raised by a hook to end a partial forward after the last block of a pass."""


def collect_stats(
    model: nn.Module,
    specs: list[LinearSpec],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    blocks_per_pass: int | None = None,
    progress: bool = True,
    stat_device: torch.device | str | None = None,
) -> dict[str, InputStats]:
    """Accumulate :class:`InputStats` for every ``input_key`` of ``specs``.

    Args:
        model: the dense (uncompressed) decoder-only causal LM (pgsvd_rt.arch).
        specs: compressible linears, from :func:`pgsvd_rt.arch.linear_specs`.
        input_ids: (S, L) int64 calibration sequences.
        attention_mask: (S, L) 0/1, or None (no padding).
        batch_size: sequences per forward.
        blocks_per_pass: decoder blocks hooked per forward pass (None: all at once); every
            Gram is returned either way (:func:`iter_stats` hands them over pass by pass).
        stat_device: where the float64 sums live (default: the model's device).

    Only the blocks of ``specs`` are hooked, and the forward stops after the last of them.

    Returns:
        input_key -> InputStats (float64, on ``stat_device``).

    Raises:
        ValueError: empty calibration input, a bad mask, or NaN/Inf activations.
    """
    stats: dict[str, InputStats] = {}
    for _, group in iter_stats(model, specs, input_ids, attention_mask, batch_size,
                               blocks_per_pass, progress, stat_device):
        stats |= group
    return stats


def iter_stats(
    model: nn.Module,
    specs: list[LinearSpec],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    blocks_per_pass: int | None = None,
    progress: bool = True,
    stat_device: torch.device | str | None = None,
) -> Iterator[tuple[tuple[int, int], dict[str, InputStats]]]:
    """:func:`collect_stats` pass by pass: yields ``((b0, b1), stats of blocks b0..b1-1)``.

    Only one pass's Grams exist at a time if the caller drops each group before asking for the
    next. Arguments and errors as :func:`collect_stats`.
    """
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"calibration input_ids must be (S, L) and non-empty, got "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids "
                         f"{tuple(input_ids.shape)}")
    if not specs:
        return
    layers = decoder_layers(model)
    n_blocks = len(layers)
    first = min(s.block for s in specs)
    last = max(s.block for s in specs) + 1  # the forward stops after this block
    step = n_blocks if blocks_per_pass is None else max(1, min(blocks_per_pass, n_blocks))
    passes = [(b, min(b + step, last)) for b in range(first, last, step)]
    device = next(model.parameters()).device
    stat_device = device if stat_device is None else stat_device
    n_batches = (input_ids.shape[0] + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * len(passes), desc="calibration", disable=not progress,
               unit="batch")
    state: dict = {"mask": None}
    # Between passes the hidden state leaving the last block of a pass is kept (one tensor per
    # batch, the size of the calibration activations), and the next pass starts there: blocks
    # before it pass their input through instead of recomputing it.
    carry: list[torch.Tensor] | None = None
    try:
        for b0, b1 in passes:
            stats: dict[str, InputStats] = {}
            handles = []
            for s in specs:
                if not b0 <= s.block < b1 or s.input_key in stats:
                    continue
                M = s.in_features
                stats[s.input_key] = InputStats(
                    torch.zeros(M, M, dtype=torch.float64, device=stat_device),
                    torch.zeros(M, dtype=torch.float64, device=stat_device))
                module = model.get_submodule(s.name)
                handles.append(module.register_forward_pre_hook(
                    _accumulate(stats[s.input_key], M, state, stat_device)))
            if carry is not None:
                handles += _resume_at(layers, b0, carry, state)
            kept: list[torch.Tensor] = []
            if b1 < n_blocks:
                def stop(_module, _args, output, kept=kept):
                    hidden = output[0] if isinstance(output, tuple) else output
                    kept.append(hidden.detach())
                    state["tuple_out"] = isinstance(output, tuple)
                    raise _StopForward
                handles.append(layers[b1 - 1].register_forward_hook(stop))
            try:
                _run_backbone(model, input_ids, attention_mask, batch_size, device, state, bar)
            finally:
                for h in handles:
                    h.remove()
            carry = kept
            _check_finite(stats)
            yield (b0, b1), stats
    finally:
        bar.close()


def _accumulate(st: InputStats, width: int, state: dict, stat_device):
    """A forward pre-hook adding the (unpadded) input rows of its linear to ``st``."""
    def hook(_module, args):
        x = args[0].reshape(-1, width)
        if state["mask"] is not None:
            x = x[state["mask"]]
        x = x.float()
        st.gram += (x.t() @ x).to(device=stat_device, dtype=torch.float64)
        st.abs_sum += x.abs().sum(0).to(device=stat_device, dtype=torch.float64)
        st.tokens += x.shape[0]

    return hook


def _check_finite(stats: dict[str, InputStats]) -> None:
    for key, st in stats.items():
        if st.tokens == 0:
            raise ValueError("calibration saw no tokens (all padding?)")
        if not torch.isfinite(st.gram).all():
            raise ValueError(f"calibration Gram of input {key!r} has NaN/Inf: the model's "
                             "activations overflow or its weights are not finite")


class _Restore:
    """A handle that puts a block's own ``forward`` back (like a hook's ``remove``)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def remove(self) -> None:
        self.layer.__dict__.pop("forward", None)


def _resume_at(layers, b0: int, carry: list[torch.Tensor], state: dict) -> list:
    """Make the next forward start at block ``b0`` from the kept hidden states.

    Blocks before ``b0`` return their input unchanged (in the form the block returns: a tensor
    or a 1-tuple), and a pre-hook on block ``b0`` swaps in the kept state of the current batch.
    """
    as_tuple = state.get("tuple_out", False)

    def passthrough(hidden_states, *args, **kwargs):
        return (hidden_states,) if as_tuple else hidden_states

    handles = []
    for layer in layers[:b0]:
        layer.forward = passthrough
        handles.append(_Restore(layer))

    def swap_in(_module, args, kwargs):
        hidden = carry[state["batch"]]
        if args:
            return (hidden, *args[1:]), kwargs
        return args, kwargs | {"hidden_states": hidden}

    handles.append(layers[b0].register_forward_pre_hook(swap_in, with_kwargs=True))
    return handles


@torch.no_grad()
def _run_backbone(model, input_ids, attention_mask, batch_size, device, state, bar) -> None:
    for n, i in enumerate(range(0, input_ids.shape[0], batch_size)):
        state["batch"] = n
        ids = input_ids[i : i + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[i : i + batch_size].to(device)
        state["mask"] = None if mask is None else mask.reshape(-1).bool()
        try:
            backbone_forward(model, ids, mask)
        except _StopForward:
            pass
        finally:
            state["mask"] = None
        bar.update(1)
