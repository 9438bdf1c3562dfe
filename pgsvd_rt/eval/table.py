"""The accuracy table: every method × ratio on one model, perplexity on one or more texts.

One calibration pass is shared by every method (Grams of the dense model). For PGSVD the
per-layer ALS objective is compared with SVD-LLM's closed form at the same rank; for SVD-ALS the
SVD-LLM row at the same ratio has the same (uniform) ranks, so its objectives are the reference.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from pgsvd_rt.compress import calibrate, compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.eval.perplexity import perplexity

log = logging.getLogger("pgsvd_rt")


def _objective_ratios(layers, reference: dict[str, float]) -> dict:
    ratios = [x.objective / reference[x.name] for x in layers
              if x.objective is not None and reference.get(x.name)]
    if not ratios:
        return {}
    return {"max": max(ratios), "median": sorted(ratios)[len(ratios) // 2],
            "within_1pct": sum(r <= 1.01 for r in ratios), "layers": len(ratios)}


def quality_table(
    dense: nn.Module,
    tokenizer,
    texts: dict[str, torch.Tensor],
    methods: list[str],
    ratios: list[float],
    calib: CalibConfig,
    windows: int = 24,
    seq_len: int = 512,
    progress: bool = True,
) -> dict:
    """Compress copies of ``dense`` with every method at every ratio and score them.

    Args:
        dense: the dense model (left untouched).
        texts: corpus name -> (T,) token stream for perplexity.
        methods: subset of svd, asvd, svd-llm, svd-als, pgsvd.
        ratios: target compressions.

    Returns:
        {"calibration", "rows": [...]} with one dense row and one row per (method, ratio).
    """
    t0 = time.perf_counter()
    stats, provenance = calibrate(dense, tokenizer, calib, progress)
    calib_s = time.perf_counter() - t0

    def score(model):
        return {name: perplexity(model, ids, seq_len, windows)["ppl"]
                for name, ids in texts.items()}

    rows = [{"method": "dense", "ppl": score(dense)}]
    for ratio in ratios:
        closed_form: dict[str, float] = {}
        for method in methods:
            model = copy.deepcopy(dense)
            config = CompressConfig(method=method, ratio=ratio, calib=calib)
            t = time.perf_counter()
            report = compress_(model, config, stats=stats, calibration=provenance,
                               compare_closed_form=(method == "pgsvd"), progress=progress)
            compress_s = time.perf_counter() - t + calib_s * config.needs_grams
            row = report.summary() | {"compress_s_incl_calibration": compress_s,
                                      "ppl": score(model)}
            del row["calibration"]
            if method == "svd-llm":
                closed_form = {x.name: x.objective for x in report.layers}
            elif method == "svd-als":
                row["als_vs_closed_form"] = _objective_ratios(report.layers, closed_form)
            elif method == "pgsvd":
                row["als_vs_closed_form"] = _objective_ratios(
                    report.layers, {x.name: x.closed_form_objective for x in report.layers})
            rows.append(row)
            log.info("%s @ %.0f%%: %s", method, 100 * ratio, row["ppl"])
            del model
    return {"calibration": provenance | {"wall_s": calib_s}, "windows": windows,
            "seq_len": seq_len, "rows": rows}


def render_markdown(result: dict) -> str:
    """A markdown table of :func:`quality_table`'s result."""
    corpora = list(result["rows"][0]["ppl"])
    head = "| method | target | achieved | " + " | ".join(f"ppl {c}" for c in corpora)
    head += " | ε | distinct ranks | dense layers | ALS/closed-form (max) | compress s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        ppl = " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora)
        if r["method"] == "dense":
            lines.append(f"| dense | - | - | {ppl} | | | | | |")
            continue
        eps = "" if r.get("eps") is None else (
            f"{r['eps']:.4f}" if isinstance(r["eps"], float) else str(r["eps"]))
        als = r.get("als_vs_closed_form") or {}
        als_txt = (f"{als['max']:.4f} ({als['within_1pct']}/{als['layers']} ≤1.01)"
                   if als else "")
        lines.append(
            f"| {r['method']} | {r['target_ratio']:.2f} | {r['achieved_ratio']:.4f} | {ppl} | "
            f"{eps} | {r['distinct_ranks']} | {r['dense_layers']} | {als_txt} | "
            f"{r['compress_s_incl_calibration']:.0f} |")
    return "\n".join(lines) + "\n"
