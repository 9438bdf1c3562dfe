"""Factor solvers: ``W (N, M) ≈ A (N, R) @ B (R, M)``, all in float64.

- :func:`svd_factors`: truncated SVD of the raw weight (the SVD baseline and the ALS start).
- :func:`asvd_factors`: SVD of ``W S`` with ``S = diag(mean|x|^α)``, then ``B ← B S⁻¹``.
- :func:`svdllm_factors`: SVD-LLM's closed form for ``min ‖(W − AB) X‖_F``: whiten with
  ``G = T Tᵀ``, truncate the SVD of ``W T``, ``B ← B T⁻¹``. A failed Cholesky (singular or
  indefinite G) falls back to ``T = Q Λ^½`` from an eigen-decomposition with a relative floor.
- :func:`closed_form_objective`: SVD-LLM's objective at a rank from singular values alone (what
  PGSVD's ALS is compared with).
- :func:`als_factors`: PGSVD's alternating least squares through ``pgsvd_rt.ops.als_solve``
  (native batched solver where built, the torch reference otherwise), SVD start, A first.

Singular values are split evenly (``A = U Σ^½``, ``B = Σ^½ Vᵀ``) so both factors have similar
scale, which keeps low-precision serving well conditioned.
"""

from __future__ import annotations

import logging

import torch

from pgsvd_rt import ops
from pgsvd_rt.compress import linalg

log = logging.getLogger("pgsvd_rt")


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, R: int):
    root = S[..., :R].sqrt()
    A = U[..., :, :R] * root.unsqueeze(-2)
    B = root.unsqueeze(-1) * Vh[..., :R, :]
    return A, B


def svd_factors(W: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of W (..., N, M) -> A (..., N, R), B (..., R, M)."""
    U, S, Vh = linalg.svd(W)
    return _split(U, S, Vh, R)


def asvd_factors(
    W: torch.Tensor, abs_mean: torch.Tensor, R: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: SVD of ``W diag(s)``, ``s = mean|x|^α`` per input channel (M,)."""
    s = abs_mean.to(W.dtype).pow(alpha)
    floor = s.max().clamp_min(torch.finfo(W.dtype).tiny) * 1e-6  # dead channels: no 1/0
    s = s.clamp_min(floor)
    A, B = svd_factors(W * s, R)
    return A, B / s


def whitening(G: torch.Tensor, eig_floor: float) -> tuple[torch.Tensor, bool]:
    """``T`` with ``T Tᵀ ≈ G``: lower Cholesky factor, or ``Q Λ^½`` when Cholesky fails.

    Returns:
        (T, fell_back): T (M, M); fell_back is True when the eigen fallback was used.
    """
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L, False
    lam, Q = linalg.eigh(G)
    floor = eig_floor * lam.max().clamp_min(torch.finfo(G.dtype).tiny)
    return Q * lam.clamp_min(floor).sqrt(), True


def svdllm_factors(
    W: torch.Tensor, G: torch.Tensor, R: int, eig_floor: float, name: str = "?"
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """SVD-LLM closed form. Returns (A, B, fell_back)."""
    T, fell_back = whitening(G, eig_floor)
    if fell_back:
        log.warning("svd-llm: Cholesky of the Gram of %s failed (singular or indefinite); "
                    "used an eigen-decomposition with relative floor %g", name, eig_floor)
    A, BT = svd_factors(W @ T, R)
    if fell_back:  # T = Q Λ^½ is invertible by the floor: T⁻¹ = Λ^-½ Qᵀ
        B = torch.linalg.solve(T, BT, left=False)
    else:
        B = torch.linalg.solve_triangular(T, BT, upper=False, left=False)
    return A, B, fell_back


def closed_form_objective(
    W: torch.Tensor, G: torch.Tensor, R: int, eig_floor: float, name: str = "?"
) -> float:
    """The objective of :func:`svdllm_factors` at rank R, without forming its factors.

    With ``G = T Tᵀ`` exactly (Cholesky), ``‖(W − AB) X‖²`` of the closed form is the sum of the
    squared singular values of ``W T`` past the R-th (singular values only: no vectors, no
    triangular solve, no residual product). After the eigen fallback ``T Tᵀ`` is only close to G,
    so the factors are formed and scored against G itself.
    """
    T, fell_back = whitening(G, eig_floor)
    if fell_back:
        A, B, _ = svdllm_factors(W, G, R, eig_floor, name)
        return objective(W, G, A, B)
    return float(linalg.svdvals(W @ T)[R:].square().sum())


def als_factors(
    W: torch.Tensor, G: torch.Tensor, R: int, iters: int, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ALS from the truncated-SVD start.

    Args:
        W: (Bt, N, M) float64. G: (Bt, M, M) or (1, M, M). R: common rank.
    """
    A0, B0 = svd_factors(W, R)
    return ops.als_solve(W, G, A0.contiguous(), B0.contiguous(), iters=iters, ridge=ridge)


def objective(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``tr((W − AB) G (W − AB)ᵀ) = ‖(W − AB) X‖_F²`` for one layer (float64)."""
    E = W - A @ B
    return float(((E @ G) * E).sum())
