import logging

import pytest
import torch

from pgsvd_rt.compress import solvers


def _problem(N=48, M=32, tokens=200, seed=0, rank_x=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, M, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -2, M, dtype=torch.float64)  # anisotropic activations
    X = torch.randn(M, tokens, generator=g, dtype=torch.float64) * scales[:, None]
    if rank_x is not None:
        X[rank_x:] = 0.0  # dead channels: a singular Gram
    return W, X @ X.t()


def test_svd_factors_are_optimal_in_frobenius():
    W, _ = _problem()
    A, B = solvers.svd_factors(W, 8)
    s = torch.linalg.svdvals(W)
    assert torch.allclose((W - A @ B).norm(), s[8:].norm(), rtol=1e-10)


def test_svdllm_beats_svd_on_activation_objective():
    W, G = _problem()
    A, B = solvers.svd_factors(W, 8)
    Ac, Bc, fell_back = solvers.svdllm_factors(W, G, 8, 1e-8)
    assert not fell_back
    assert solvers.objective(W, G, Ac, Bc) < solvers.objective(W, G, A, B)


@pytest.mark.parametrize("R", [1, 8, 31])
def test_closed_form_objective_equals_the_factors_objective(R):
    """From singular values alone, the objective of SVD-LLM's factors (what PGSVD's rows compare
    ALS with), and through the factors themselves after the eigen fallback."""
    W, G = _problem()
    Ac, Bc, _ = solvers.svdllm_factors(W, G, R, 1e-8)
    want = solvers.objective(W, G, Ac, Bc)
    assert solvers.closed_form_objective(W, G, R, 1e-8) == pytest.approx(want, rel=1e-9)
    W, G = _problem(rank_x=20)  # singular Gram: Cholesky fails
    Ac, Bc, fell_back = solvers.svdllm_factors(W, G, R, 1e-8)
    assert fell_back
    assert solvers.closed_form_objective(W, G, R, 1e-8) == solvers.objective(W, G, Ac, Bc)


def test_svdllm_falls_back_on_singular_gram(caplog):
    W, G = _problem(rank_x=20)
    with caplog.at_level(logging.WARNING, logger="pgsvd_rt"):
        A, B, fell_back = solvers.svdllm_factors(W, G, 8, 1e-8, name="layer.x")
    assert fell_back
    assert "layer.x" in caplog.text and "Cholesky" in caplog.text
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    # still (near) optimal: within 1e-6 of the best achievable on the live subspace
    ref = solvers.objective(W, G, *solvers.svd_factors(W, 8))
    assert solvers.objective(W, G, A, B) <= ref


def _realistic(R, N=48, M=32):
    """Decaying weight spectrum and moderately anisotropic activations, like real layers."""
    g = torch.Generator().manual_seed(R)
    U, _ = torch.linalg.qr(torch.randn(N, M, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64))
    W = (U * torch.arange(1, M + 1, dtype=torch.float64).pow(-0.7)) @ V.t()
    X = torch.randn(M, 200, generator=g, dtype=torch.float64)
    X *= torch.logspace(0, -1, M, dtype=torch.float64)[:, None]
    return W, X @ X.t()


@pytest.mark.parametrize("R", [1, 4, 12])
def test_als_ten_iterations_land_within_one_percent_of_closed_form(R):
    W, G = _realistic(R)
    A, B = solvers.als_factors(W[None], G[None], R, iters=10, ridge=1e-10)
    Ac, Bc, _ = solvers.svdllm_factors(W, G, R, 1e-8)
    obj, best = solvers.objective(W, G, A[0], B[0]), solvers.objective(W, G, Ac, Bc)
    assert obj <= 1.01 * best, f"ALS objective {obj:.6g} vs closed form {best:.6g}"


def test_als_fixed_point_is_the_closed_form():
    W, G = _problem(seed=12)  # flat weight spectrum, strongly anisotropic X: slow convergence
    A, B = solvers.als_factors(W[None], G[None], 12, iters=400, ridge=1e-10)
    Ac, Bc, _ = solvers.svdllm_factors(W, G, 12, 1e-8)
    obj, best = solvers.objective(W, G, A[0], B[0]), solvers.objective(W, G, Ac, Bc)
    assert abs(obj / best - 1) < 1e-6, f"ALS objective {obj:.10g} vs closed form {best:.10g}"


def test_als_handles_singular_gram():
    W, G = _problem(rank_x=10)
    A, B = solvers.als_factors(W[None], G[None], 16, iters=10, ridge=1e-10)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_asvd_with_dead_channel_is_finite():
    W, G = _problem()
    abs_mean = torch.rand(W.shape[1], dtype=torch.float64)
    abs_mean[3] = 0.0
    A, B = solvers.asvd_factors(W, abs_mean, 8, 0.5)
    assert torch.isfinite(A @ B).all()
