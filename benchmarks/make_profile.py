"""Rank profiles for the end-to-end benchmark, from the embedded model's real spectra (CPU, ~30 s).

    python benchmarks/make_profile.py --out benchmarks/profiles

Writes ``smollm2-135m.json`` (the embedded model's own PGSVD and uniform ranks) and
``llama2-7b.json`` (ranks for a LLaMA-2-7B-shaped model), each with pgsvd / svd-als at 20% and
40% compression. The GPU benchmark reads them, so it needs neither the 98 MB model nor an SVD.

How the 7B profile is derived (weights' values do not change latency, ranks do):

1. For every linear l of SmolLM2-135M (30 blocks x q/k/v/o/gate/up/down) take the relative
   truncation-error curve of its raw weight, ``e_l(r) = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``
   (``pgsvd_rt.compress.ranks.spectrum``), and read it as a function of the *relative* rank
   ``f = r / min(N, K)``.
2. A 7B layer (block B of 32, projection p) takes the curve of the SmolLM2 layer with the same
   projection at the same relative depth, block ``round(B / 31 * 29)``, and rescales it to its own
   shape: ``e_7B(r) = interp(r / min(N_7B, K_7B); f_l, e_l)`` for r = 0..min(N_7B, K_7B)
   (linear interpolation, which keeps it non-increasing).
3. PGSVD ranks follow from one tolerance as in the paper: ``r(eps) = min {r : e(r) <= eps}``,
   with eps the smallest breakpoint whose total ``sum r (N + K)`` meets the 20% / 40% budget on
   the 7B shapes (``ranks.allocate``: exact bisection over breakpoints; layers past break-even
   stay dense). svd-als ranks are uniform, ``int((1 - rho) N K / (N + K))``.

Caveat: a 135M model's spectra are flatter per relative rank than a 7B model's are believed to
be; the profile gives a realistic *spread* of ranks (depth and projection pattern), not the 7B
model's actual ranks. The uniform svd-als ranks do not depend on it at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pgsvd_rt.compress import ranks as rk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import MODELS, PROJS, block_linears  # noqa: E402

RATIOS = (0.2, 0.4)
HF_NAME = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}


def smollm2_spectra() -> dict[tuple[int, str], rk.Spectrum]:
    """(block, proj) -> spectrum of the embedded model's raw weight."""
    from pgsvd_rt import models

    model, _, _ = models.load("smollm2-135m")
    out = {}
    for b, block in enumerate(models.decoder_layers(model)):
        for p in PROJS:
            out[(b, p)] = rk.spectrum(block.get_submodule(HF_NAME[p]).weight)
    return out


def transfer(spec: rk.Spectrum, N: int, K: int) -> rk.Spectrum:
    """The error curve of ``spec`` over relative rank, rescaled to an (N, K) layer."""
    k_small = spec.err.numel() - 1
    f_small = torch.arange(k_small + 1, dtype=torch.float64) / k_small
    k_big = min(N, K)
    f_big = torch.arange(k_big + 1, dtype=torch.float64) / k_big
    import numpy as np

    err = torch.from_numpy(np.interp(f_big.numpy(), f_small.numpy(), spec.err.numpy()))
    err = torch.cummin(err, 0).values
    err[-1] = 0.0
    return rk.Spectrum(N, K, err)


def profile(model: str, spectra: list[rk.Spectrum], layers: list[tuple[int, str]]) -> dict:
    """pgsvd and svd-als ranks at each ratio: {name: {"ranks": {proj: [R or None per block]}}}."""
    shapes = [(s.out_features, s.in_features) for s in spectra]
    blocks = MODELS[model]["layers"]
    out = {}
    for rho in RATIOS:
        pg, eps = rk.allocate(spectra, ratio=rho)
        uni = [rk.uniform_rank(N, K, rho) for N, K in shapes]
        for method, rs, e in (("pgsvd", pg, eps), ("svd-als", uni, None)):
            per = {p: [None] * blocks for p in PROJS}
            for (b, p), r in zip(layers, rs, strict=True):
                per[p][b] = r
            out[f"{method}-{int(rho * 100)}"] = {
                "method": method, "target_ratio": rho, "eps": e,
                "achieved_ratio": rk.achieved_ratio(shapes, rs),
                "dense_layers": sum(r is None for r in rs),
                "distinct_ranks": len({r for r in rs if r is not None}),
                "ranks": per,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "profiles"))
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    small = smollm2_spectra()
    docs = {
        "smollm2-135m": "PGSVD ranks from the embedded model's own spectra (ranks.allocate), "
                        "uniform svd-als ranks int((1-rho)NK/(N+K)).",
        "llama2-7b": __doc__.split("How the 7B profile is derived")[1].split("Caveat")[0].strip(),
    }
    n_small = MODELS["smollm2-135m"]["layers"]
    for model in ("smollm2-135m", "llama2-7b"):
        blocks = MODELS[model]["layers"]
        shapes = {proj: (N, K) for proj, N, K in block_linears(model)}
        layers = [(b, proj) for b in range(blocks) for proj in PROJS]
        if model == "smollm2-135m":
            spectra = [small[bp] for bp in layers]
        else:
            spectra = [transfer(small[(round(b / (blocks - 1) * (n_small - 1)), proj)],
                                *shapes[proj]) for b, proj in layers]
        res = {"model": model, "config": MODELS[model],
               "shapes": {proj: list(s) for proj, s in shapes.items()},
               "source_spectra": "smollm2-135m (embedded, dequantised Q4_1, fp32 raw weights)",
               "derivation": docs[model], "profiles": profile(model, spectra, layers)}
        path = os.path.join(a.out, f"{model}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        summary = {k: (round(v["achieved_ratio"], 4), v["eps"], v["distinct_ranks"])
                   for k, v in res["profiles"].items()}
        sys.stdout.write(f"wrote {path}: {summary}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
