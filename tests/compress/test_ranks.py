import pytest
import torch

from pgsvd_rt.compress import ranks as rk


def _weight(N, M, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(N, M)
    U, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(M, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-decay)
    return (U * s) @ V.t()


def _spectra():
    shapes = [(48, 32, 0.3), (32, 32, 1.0), (16, 32, 0.6), (64, 24, 2.0), (40, 40, 0.1)]
    return [rk.spectrum(_weight(N, M, d, seed=i)) for i, (N, M, d) in enumerate(shapes)]


def test_rank_for_eps_matches_definition():
    W = _weight(30, 20, 0.7)
    sp = rk.spectrum(W)
    s = torch.linalg.svdvals(W)
    for eps in (0.0, 0.05, 0.2, 0.5, 0.99, 1.0):
        errs = [float(s[r:].norm() / s.norm()) for r in range(s.numel() + 1)]
        brute = max(1, min(r for r, e in enumerate(errs) if e <= eps + 1e-15))
        assert rk.rank_for_eps(sp, eps) == brute, eps


def test_eps_for_ratio_is_the_exact_smallest_breakpoint():
    spectra = _spectra()
    dense = sum(sp.dense_cost for sp in spectra)
    for ratio in (0.1, 0.2, 0.4, 0.6):
        eps = rk.eps_for_ratio(spectra, ratio)
        assert rk.cost_at_eps(spectra, eps) <= (1 - ratio) * dense
        smaller = torch.unique(torch.cat([sp.err for sp in spectra]))
        smaller = smaller[smaller < eps]
        if smaller.numel():  # the next breakpoint below misses the budget
            assert rk.cost_at_eps(spectra, float(smaller[-1])) > (1 - ratio) * dense


def test_allocate_gives_heterogeneous_ranks_and_counts_dense_layers():
    spectra = _spectra()
    ranks, eps = rk.allocate(spectra, ratio=0.3)
    shapes = [(sp.out_features, sp.in_features) for sp in spectra]
    assert rk.achieved_ratio(shapes, ranks) >= 0.3
    assert len({r for r in ranks if r is not None}) > 1
    # the flat-spectrum layer (decay 0.1) reaches break-even and stays dense
    assert ranks[-1] is None


def test_break_even_layer_is_dense():
    sp = rk.spectrum(_weight(8, 8, 0.0))
    ranks, _ = rk.allocate([sp], eps=0.0)
    assert ranks == [None]


def test_uniform_rank_formula():
    assert rk.uniform_rank(4096, 4096, 0.2) == int(0.8 * 4096 * 4096 / 8192)
    assert rk.uniform_rank(192, 576, 0.4) == int(0.6 * 192 * 576 / 768)
    assert rk.uniform_rank(2, 2, 0.99) == 1


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        rk.eps_for_ratio(_spectra(), ratio)
    with pytest.raises(ValueError, match="ratio"):
        rk.uniform_rank(8, 8, ratio)


@pytest.mark.parametrize("eps", [-0.01, 1.01, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        rk.allocate(_spectra(), eps=eps)


def test_unreachable_target():
    spectra = [rk.spectrum(_weight(4, 4, 0.5))]  # rank 1 stores 8 of 16: at most 50%
    with pytest.raises(ValueError, match="unreachable"):
        rk.eps_for_ratio(spectra, 0.6)


def test_nan_weight():
    W = _weight(8, 8, 0.5)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        rk.spectrum(W)
