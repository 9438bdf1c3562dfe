"""The accuracy rule every lowrank_matmul backend is held to, shared by the kernel tests.

House rule (flash-attention style): a backend's max abs error against the fp64 reference must be
at most 2x the max abs error of PyTorch's own same-dtype two-matmul path
(``(x @ v) @ u.T + bias`` in that dtype, on the same device), and never has to be below a floor
that each output's own terms set: ``2 eps(fp32) ((|x| |v|) |u|.T + |b|)``, elementwise.

Why the floor: the error of a sum in floating point depends on the order it was summed in, and
its standard bound is eps times the sum of its terms' magnitudes times a factor that is small
for the blocked or chunked sums kernels and libraries do (Higham, Accuracy and Stability of
Numerical Algorithms, ch. 3). Two correct kernels summing in different orders differ by that
much; PyTorch's own error can land below it by luck of its BLAS's order: on an Intel Xeon its
fp32 error at one row of K = 1000 was 2.5e-7 (half an ulp of outputs near 4) and a correct
kernel at 1.5 ulps failed 2x that. The floor uses fp32's eps for every dtype, as every backend
sums in fp32 (or wider): in bf16, PyTorch's error (which rounds t and y to bf16) is far above it,
so bf16 is held to 2x PyTorch as before. A real error (a term dropped, t rounded to a narrower
type, the bias forgotten, a wrong row) exceeds the bound by orders of magnitude
(tests/ops/test_accuracy_rule.py perturbs results to show it).
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


def lowrank_bound(x, u, v, b) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(fp64 reference, PyTorch's own max abs error, the bound per output)."""
    xd, ud, vd = x.double(), u.double(), v.double()
    ref = (xd @ vd) @ ud.t()
    torch_y = (x @ v) @ u.t()
    mag = (xd.abs() @ vd.abs()) @ ud.abs().t()
    if b is not None:
        ref = ref + b.double()
        torch_y = torch_y + b
        mag = mag + b.double().abs()
    torch_err = (torch_y.double() - ref).abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * mag
    return ref, torch_err, floor.clamp(min=2 * torch_err)


def check_lowrank(y, x, u, v, b):
    """Asserts y = (x @ v) @ u.T + b within the rule above; prints the worst output's error and
    bound."""
    ref, torch_err, bound = lowrank_bound(x, u, v, b)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.is_contiguous()
    err = (y.double() - ref).abs()
    i = (err / bound).argmax()
    e, bd = err.view(-1)[i].item(), bound.view(-1)[i].item()
    assert e <= bd, (f"max abs error {e:.3e} > bound {bd:.3e} at output {i.item()} "
                     f"(torch's max {torch_err:.3e})")
