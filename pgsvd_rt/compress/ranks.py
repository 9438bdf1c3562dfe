"""Rank allocation: PGSVD's one-tolerance ranks, the exact ε for a target, uniform baselines.

For a layer with singular values σ (of the raw weight, no activations):
``e(r) = sqrt(Σ_{i>r} σ_i²) / sqrt(Σ σ_i²)`` and ``r(ε) = min {r : e(r) ≤ ε}`` (at least 1).
A rank at or past the break-even ``N M / (N + M)`` keeps the layer dense (cost ``N M``).
The total cost ``H(ε)`` is a non-increasing step function that changes only at the breakpoints
``e_l(r)``; the smallest ε meeting a budget is found by bisection over the sorted breakpoints,
so it is exact, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgsvd_rt.compress import linalg


@dataclass(frozen=True)
class Spectrum:
    """Relative truncation errors of one layer: ``err[r] = e(r)`` for r = 0..min(N, M)."""

    out_features: int
    in_features: int
    err: torch.Tensor  # (min(N, M) + 1,) float64, non-increasing, err[0] = 1, err[-1] = 0

    @property
    def dense_cost(self) -> int:
        return self.out_features * self.in_features

    def factored_cost(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    def is_dense_at(self, rank: int) -> bool:
        """True when a rank-``rank`` factorisation stores no fewer parameters than W."""
        return self.factored_cost(rank) >= self.dense_cost


def spectrum(weight: torch.Tensor) -> Spectrum:
    """Spectrum of a (N, M) weight (singular values in float64)."""
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has NaN/Inf values")
    s = linalg.svdvals(weight.detach().to(torch.float64)).cpu()  # on the weight's device
    energy = s.square()
    total = energy.sum()
    if total == 0:
        err = torch.zeros(s.numel() + 1, dtype=torch.float64)
    else:
        # tail[r] = Σ_{i >= r} σ_i² (0-based), so e(r) = sqrt(tail[r] / total)
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        err = (tail / total).clamp_min(0).sqrt()
        err = torch.cummin(err, 0).values  # exact monotonicity despite rounding
    N, M = weight.shape
    return Spectrum(N, M, err)


def rank_for_eps(spec: Spectrum, eps: float) -> int:
    """``r(ε)``: the smallest rank r >= 1 with ``e(r) <= ε``."""
    # err is non-increasing: count of entries > eps is the first index with err <= eps
    r = int((spec.err > eps).sum().item())
    return max(1, r)


def cost_at_eps(spectra: list[Spectrum], eps: float) -> int:
    """``H(ε)``: parameters stored when every layer takes ``r(ε)`` (dense past break-even)."""
    total = 0
    for sp in spectra:
        r = rank_for_eps(sp, eps)
        total += sp.dense_cost if sp.is_dense_at(r) else sp.factored_cost(r)
    return total


def eps_for_ratio(spectra: list[Spectrum], ratio: float) -> float:
    """The smallest ε whose ranks compress the layers by at least ``ratio``.

    Raises:
        ValueError: ``ratio`` outside (0, 1), or unreachable even at rank 1 everywhere.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    if not spectra:
        raise ValueError("no layers to compress")
    budget = (1.0 - ratio) * sum(sp.dense_cost for sp in spectra)
    candidates = torch.unique(torch.cat([sp.err for sp in spectra]))  # sorted ascending
    if cost_at_eps(spectra, float(candidates[-1])) > budget:
        best = 1.0 - cost_at_eps(spectra, 1.0) / sum(sp.dense_cost for sp in spectra)
        raise ValueError(
            f"target compression {ratio:.4f} is unreachable: rank 1 everywhere gives {best:.4f}"
        )
    lo, hi = 0, candidates.numel() - 1  # invariant: H(candidates[hi]) <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_at_eps(spectra, float(candidates[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[hi])


def uniform_rank(out_features: int, in_features: int, ratio: float) -> int:
    """Baseline rank for a uniform ratio: ``int((1 − ρ) N M / (N + M))``, at least 1."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    N, M = out_features, in_features
    return max(1, int((1.0 - ratio) * N * M / (N + M)))


def achieved_ratio(shapes: list[tuple[int, int]], ranks: list[int | None]) -> float:
    """``1 − Σ P_l / Σ N_l M_l`` for (N, M) shapes; a rank of None means the layer stays dense."""
    dense = sum(N * M for N, M in shapes)
    stored = sum(N * M if r is None else r * (N + M)
                 for (N, M), r in zip(shapes, ranks, strict=True))
    return 1.0 - stored / dense


def allocate(
    spectra: list[Spectrum],
    *,
    ratio: float | None = None,
    eps: float | None = None,
) -> tuple[list[int | None], float]:
    """PGSVD ranks for one ε (given, or the exact ε for ``ratio``).

    Returns:
        (ranks, eps): per-layer rank, None where the layer stays dense; the ε used.
    """
    if (ratio is None) == (eps is None):
        raise ValueError("give exactly one of ratio or eps")
    if eps is None:
        eps = eps_for_ratio(spectra, ratio)
    elif not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps!r}")
    ranks: list[int | None] = []
    for sp in spectra:
        r = rank_for_eps(sp, eps)
        ranks.append(None if sp.is_dense_at(r) else r)
    return ranks, eps
