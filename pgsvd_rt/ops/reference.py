"""Pure-torch reference implementations: the single source of truth for every op.

Every fast path (Triton, C++, CUDA) is tested against these functions. They run on any device
and any floating dtype, and are registered as the ``default`` kernel of each op in
:mod:`pgsvd_rt.ops._library`.
"""

from __future__ import annotations

import torch


def lowrank_matmul(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = (x @ v) @ u.T + bias.

    Args:
        x: (..., K) activations.
        u: (N, R) left factor (the ``A`` of ``W ≈ A B``).
        v: (K, R) right factor, stored transposed (``B.T``) so both factors are row-major in R.
        bias: (N,) or None.

    Returns:
        (..., N) in x's dtype.
    """
    y = (x @ v) @ u.t()
    if bias is not None:
        y = y + bias
    return y


def lowrank_matmul_int8(
    x: torch.Tensor, u: torch.Tensor, u_scale: torch.Tensor, vt: torch.Tensor,
    vt_scale: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x @ vt.T) * vt_scale) @ u.T * u_scale + bias, int8 factors, fp32 arithmetic.

    Args:
        x: (..., K) activations.
        u: (N, R) int8, the rows of ``A`` each scaled by ``u_scale`` (N,).
        vt: (R, K) int8, the rows of ``B`` (columns of ``v``) each scaled by ``vt_scale`` (R,).
        bias: (N,) or None.

    Returns:
        (..., N) in x's dtype. The scales act on the (..., R) intermediate and on the output,
        never inside a dot product.
    """
    t = (x.float() @ vt.float().t()) * vt_scale.float()
    y = (t @ u.float().t()) * u_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _spd_solve(lhs: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``lhs @ X = rhs`` for symmetric positive semi-definite (batched) r×r ``lhs``.

    Cholesky first; where it fails (singular or numerically indefinite) the failed problems are
    retried with ``ridge · (mean diagonal + tiny)`` added to the diagonal (Tikhonov), so the solve
    never raises on rank-deficient inputs.
    """
    chol, info = torch.linalg.cholesky_ex(lhs)
    if bool((info != 0).any()):
        r = lhs.shape[-1]
        diag_mean = lhs.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)
        eye = torch.eye(r, dtype=lhs.dtype, device=lhs.device)
        shift = ridge * (diag_mean + torch.finfo(lhs.dtype).tiny)
        damped = lhs + shift.unsqueeze(-1) * eye
        chol_d, info_d = torch.linalg.cholesky_ex(damped)
        if bool((info_d != 0).any()):  # pathological (NaN-free but indefinite): LU solve
            return torch.linalg.solve(damped, rhs)
        failed = (info != 0).view(*info.shape, 1, 1)
        chol = torch.where(failed, chol_d, chol)
    return torch.cholesky_solve(rhs, chol)


def als_solve(
    W: torch.Tensor,
    G: torch.Tensor,
    A0: torch.Tensor,
    B0: torch.Tensor,
    iters: int,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares for ``min ‖W X − A B X‖_F²`` given the Gram ``G = X Xᵀ``.

    Each iteration (A first; from an SVD start a B-first step is a no-op)::

        A ← W G Bᵀ (B G Bᵀ)⁺
        B ← (Aᵀ A)⁺ Aᵀ W          # G cancels out of this step

    Only r×r systems are solved (Cholesky, ridge on failure); no M×M inverse is ever formed.

    Args:
        W: (Bt, N, M) weights, ``nn.Linear.weight`` layout.
        G: (Bt, M, M) or (1, M, M) (shared) uncentred Gram of the layer inputs.
        A0: (Bt, N, R) initial left factor.
        B0: (Bt, R, M) initial right factor.
        iters: number of ALS iterations (>= 0).
        ridge: relative Tikhonov shift used only where a Cholesky fails.

    Returns:
        (A, B) of shapes (Bt, N, R) and (Bt, R, M), in W's dtype.
    """
    WG = W @ G  # (Bt, N, M); constant over the iterations
    A, B = A0, B0
    for _ in range(iters):
        GBt = G @ B.transpose(-1, -2)  # (Bt, M, R)
        lhs = B @ GBt  # B G Bᵀ, (Bt, R, R)
        rhs = (WG @ B.transpose(-1, -2)).transpose(-1, -2)  # (W G Bᵀ)ᵀ, (Bt, R, N)
        A = _spd_solve(lhs, rhs, ridge).transpose(-1, -2)
        At = A.transpose(-1, -2)
        B = _spd_solve(At @ A, At @ W, ridge)
    return A, B
