"""PGSVD for a two-tower VLM (transformers' ``CLIPModel``): one ε per tower.

Compressed: q/k/v/out_proj and fc1/fc2 of every encoder layer of the vision and the text tower.
Patch/position embeddings, layer norms and the two projections stay dense.

Ranks: the removed parameters ``ρ Σ N M`` are split between the towers, a share ``s`` to the
vision tower and ``1 − s`` to the text tower; each tower's ε is then bisected exactly
(:func:`pgsvd_rt.compress.ranks.eps_for_ratio`) to its own ratio ``s ρ D / D_v`` (resp.
``(1 − s) ρ D / D_t``). ``s`` is a 1-D knob searched over a small grid on a calibration metric:
the relative Frobenius error of the image-text logits of the compressed model against the dense
one on the calibration batch (lower is better). The paper says only "one ε per tower, each
bisected to its share"; the grid and the metric are our choice.

Factors: the ALS solver of :mod:`pgsvd_rt.compress.pipeline` on Grams from one dense pass over
the calibration batch (images and token ids; padded text positions excluded). Factors are cached
per (layer, rank) across the grid, so each split costs only the ranks it adds.

Accuracy is unmeasured: no CLIP weights are reachable offline, so this mode is tested on small
randomly initialised CLIPs only.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pgsvd_rt.compress import ranks as rk
from pgsvd_rt.compress.calibration import InputStats
from pgsvd_rt.compress.pipeline import solve_als
from pgsvd_rt.config import CompressConfig
from pgsvd_rt.models import LinearSpec
from pgsvd_rt.nn import LowRankLinear, replace_linear

log = logging.getLogger("pgsvd_rt")

TOWERS = {"vision": "vision_model", "text": "text_model"}
DEFAULT_SPLITS = (0.2, 0.35, 0.5, 0.65, 0.8)


def clip_linear_specs(model: nn.Module) -> list[LinearSpec]:
    """The compressible linears of both towers; ``cls`` is the tower (``vision``/``text``)."""
    specs = []
    for tower, attr in TOWERS.items():
        layers = getattr(getattr(getattr(model, attr, None), "encoder", None), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{type(model).__name__}: expected {attr}.encoder.layers (CLIPModel)")
        for i, layer in enumerate(layers):
            for parent, proj in (("self_attn", "q_proj"), ("self_attn", "k_proj"),
                                 ("self_attn", "v_proj"), ("self_attn", "out_proj"),
                                 ("mlp", "fc1"), ("mlp", "fc2")):
                mod = getattr(getattr(layer, parent), proj)
                key = f"{tower}.{i}.attn_in" if proj in ("q_proj", "k_proj", "v_proj") \
                    else f"{tower}.{i}.{proj}_in"
                specs.append(LinearSpec(
                    name=f"{attr}.encoder.layers.{i}.{parent}.{proj}", block=i, proj=proj,
                    cls=tower, input_key=key, out_features=mod.out_features,
                    in_features=mod.in_features, bias=mod.bias is not None))
    return specs


@torch.no_grad()
def collect_clip_stats(
    model: nn.Module, specs: list[LinearSpec], pixel_values: torch.Tensor,
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
) -> dict[str, InputStats]:
    """Grams (float64) of every distinct linear input over one dense forward of the batch.

    Args:
        pixel_values: (B_img, 3, H, W) float. input_ids: (B_txt, L) int64.
        attention_mask: (B_txt, L) 0/1 for the text tower (None: no padding).
    """
    stats: dict[str, InputStats] = {}
    text_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
    handles = []

    def make_hook(key: str, width: int, tower: str):
        def hook(_module, args):
            x = args[0].reshape(-1, width)
            if tower == "text" and text_mask is not None:
                x = x[text_mask.to(x.device)]
            x = x.double().cpu()
            st = stats[key]
            st.gram += x.t() @ x
            st.abs_sum += x.abs().sum(0)
            st.tokens += x.shape[0]
        return hook

    try:
        for s in specs:
            if s.input_key in stats:
                continue
            M = s.in_features
            stats[s.input_key] = InputStats(torch.zeros(M, M, dtype=torch.float64),
                                            torch.zeros(M, dtype=torch.float64))
            handles.append(model.get_submodule(s.name).register_forward_pre_hook(
                make_hook(s.input_key, M, s.cls)))
        model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    for key, st in stats.items():
        if not torch.isfinite(st.gram).all():
            raise ValueError(f"calibration Gram of {key!r} has NaN/Inf")
    return stats


def tower_ratios(dense: dict[str, int], ratio: float, split: float) -> dict[str, float]:
    """Per-tower ratios giving ``split`` of the removed parameters to the vision tower."""
    if not 0.0 < split < 1.0:
        raise ValueError(f"split must be in (0, 1), got {split!r}")
    removed = ratio * sum(dense.values())
    out = {"vision": split * removed / dense["vision"],
           "text": (1.0 - split) * removed / dense["text"]}
    for tower, r in out.items():
        if not 0.0 < r < 1.0:
            raise ValueError(f"split {split}: the {tower} tower would need compression {r:.3f} "
                             "(outside (0, 1)); choose a split nearer the towers' sizes")
    return out


@dataclass
class VLMReport:
    ratio: float
    split: float
    eps: dict
    tower_ratio: dict  # achieved per tower
    achieved_ratio: float
    ranks: dict  # layer name -> rank (None: dense)
    search: list = field(default_factory=list)  # [{"split", "metric", "eps", ...}]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def logits_error(model: nn.Module, reference: torch.Tensor, batch: dict) -> float:
    """Relative Frobenius error of ``logits_per_image`` against the dense ``reference``."""
    out = model(**batch).logits_per_image
    return float((out - reference).norm() / reference.norm().clamp_min(1e-30))


def compress_clip_(
    model: nn.Module,
    ratio: float,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    splits: tuple[float, ...] = DEFAULT_SPLITS,
    als_iters: int = 10,
    progress: bool = False,
) -> VLMReport:
    """Compress both towers of a ``CLIPModel`` in place (PGSVD, one ε per tower).

    Args:
        model: a dense ``CLIPModel``.
        ratio: target compression of the compressed linears, in (0, 1).
        pixel_values, input_ids, attention_mask: the calibration batch (also scores the splits).
        splits: candidate shares of the removed parameters given to the vision tower; splits
            that would push a tower outside (0, 1) are skipped.

    Returns:
        A :class:`VLMReport` with the chosen split, ε per tower, ranks and the search table.
    """
    config = CompressConfig(method="pgsvd", ratio=ratio, als_iters=als_iters)
    specs = clip_linear_specs(model)
    for s in specs:
        if not isinstance(model.get_submodule(s.name), nn.Linear):
            raise ValueError(f"{s.name} is not a dense nn.Linear: already compressed")
    model.eval()
    batch = {"pixel_values": pixel_values, "input_ids": input_ids,
             "attention_mask": attention_mask}
    stats = collect_clip_stats(model, specs, pixel_values, input_ids, attention_mask)
    reference = model(**batch).logits_per_image
    weights = [model.get_submodule(s.name).weight.detach().double().cpu() for s in specs]
    spectra = [rk.spectrum(W) for W in weights]
    grams = [stats[s.input_key].gram for s in specs]
    idx = {t: [i for i, s in enumerate(specs) if s.cls == t] for t in TOWERS}
    dense = {t: sum(spectra[i].dense_cost for i in idx[t]) for t in TOWERS}
    cache: dict[tuple[int, int], tuple] = {}

    def plan(split: float):
        target = tower_ratios(dense, ratio, split)
        ranks: list[int | None] = [None] * len(specs)
        eps = {}
        for t in TOWERS:
            tr, eps[t] = rk.allocate([spectra[i] for i in idx[t]], ratio=target[t])
            for i, r in zip(idx[t], tr, strict=True):
                ranks[i] = r
        return ranks, eps

    def factors_for(ranks):
        jobs = [(i, R) for i, R in enumerate(ranks) if R is not None and (i, R) not in cache]
        for i, (A, B, _) in solve_als(jobs, weights, grams, config, progress).items():
            cache[(i, ranks[i])] = (A, B)
        return {specs[i].name: cache[(i, R)] for i, R in enumerate(ranks) if R is not None}

    def apply(target: nn.Module, factors: dict) -> None:
        repl = {}
        for name, (A, B) in factors.items():
            dense_mod = target.get_submodule(name)
            bias = None if dense_mod.bias is None else dense_mod.bias.detach()
            repl[name] = LowRankLinear.from_factors(A, B, bias, dtype=dense_mod.weight.dtype)
        replace_linear(target, repl)

    search, best = [], None
    for split in splits:
        try:
            ranks, eps = plan(split)
        except ValueError as exc:
            log.info("vlm: split %.2f skipped: %s", split, exc)
            continue
        trial = copy.deepcopy(model)
        apply(trial, factors_for(ranks))
        metric = logits_error(trial, reference, batch)
        del trial
        row = {"split": split, "metric": metric, "eps": eps}
        search.append(row)
        log.info("vlm: split %.2f -> ε %s, logits error %.4g", split, eps, metric)
        if best is None or metric < best[0]["metric"]:
            best = (row, ranks)
    if best is None:
        raise ValueError(f"no split in {splits} is feasible at ratio {ratio}")
    row, ranks = best
    apply(model, factors_for(ranks))
    shapes = [(s.out_features, s.in_features) for s in specs]
    per_tower = {t: rk.achieved_ratio([shapes[i] for i in idx[t]], [ranks[i] for i in idx[t]])
                 for t in TOWERS}
    return VLMReport(ratio=ratio, split=row["split"], eps=row["eps"], tower_ratio=per_tower,
                     achieved_ratio=rk.achieved_ratio(shapes, ranks),
                     ranks={s.name: r for s, r in zip(specs, ranks, strict=True)}, search=search)
