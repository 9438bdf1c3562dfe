"""The accuracy rule every lowrank_matmul backend is held to, shared by the kernel tests.

House rule (flash-attention style): a backend's max abs error against the fp64 reference must be
at most 2x the max abs error of PyTorch's own same-dtype two-matmul path
(``(x @ v) @ u.T + bias`` in that dtype, on the same device). Where PyTorch happens to be exact
(error exactly 0) the bound is one ulp of the largest output, ``eps(dtype) * max|y|``.
"""

from __future__ import annotations

import torch


def lowrank_factors(M, K, N, R, dtype, device, bias, layout, seed):
    """x (M, K) in ``layout`` (contig / sliced / transposed strides), u (N, R), v (K, R), bias."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # x.T of a (K, M) tensor: strides (1, M)
        x = torch.randn(K, M, generator=g).t()
    elif layout == "sliced":  # every other column of a wider tensor: strides (2K+3, 2)
        x = torch.randn(M, 2 * K + 3, generator=g)[:, 1:2 * K + 1:2]
    else:
        x = torch.randn(M, K, generator=g)
    u = torch.randn(N, R, generator=g) / R**0.5
    v = torch.randn(K, R, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(u), cast(v), cast(b)


def check_lowrank(y, x, u, v, b):
    """Asserts y = (x @ v) @ u.T + b within the 2x-PyTorch rule; prints error and bound."""
    ref = (x.double() @ v.double()) @ u.double().t()
    torch_y = (x @ v) @ u.t()
    if b is not None:
        ref = ref + b.double()
        torch_y = torch_y + b
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    err = (y.double() - ref).abs().max().item()
    torch_err = (torch_y.double() - ref).abs().max().item()
    bound = 2 * torch_err if torch_err > 0 else torch.finfo(x.dtype).eps * ref.abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > bound {bound:.3e} (torch {torch_err:.3e})"
