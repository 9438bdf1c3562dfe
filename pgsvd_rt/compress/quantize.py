"""Int8 factors: symmetric int8 with a scale per row of ``A`` (u) and per row of ``B`` (each
rank), clipping chosen by the layer's activation-weighted error.

With ``G = Σ x xᵀ`` (the layer's Gram; the identity without calibration), the error of factors
``A_q B_q`` is ``‖(A B − A_q B_q) X‖_F² = tr(E G Eᵀ)``. A clip ratio c scales every row's
``max |·|`` before it maps to 127 (c < 1 trades saturated outliers for finer steps). Chosen
per layer on a grid, B first with A exact (error ``tr(AᵀA ΔB G ΔBᵀ)``), then A given B_q
(error ``tr(ΔA (B_q G B_qᵀ) ΔAᵀ)``): both use only R-sized and (R, K) products. The reported
``rel_error`` is ``tr(E G Eᵀ) / tr((A B) G (A B)ᵀ)``, the share quantization adds on top of the
low-rank factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Clip ratios tried for each factor.
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


@dataclass
class Int8Factors:
    """u (N, R) int8 and u_scale (N,); vt (R, K) int8 and vt_scale (R,); scales float64."""

    u: torch.Tensor
    u_scale: torch.Tensor
    vt: torch.Tensor
    vt_scale: torch.Tensor
    clip_u: float
    clip_v: float
    rel_error: float


def quantize_rows(X: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``X ≈ q * scale[:, None]``, |q| <= 127."""
    amax = X.abs().amax(dim=1).clamp_min(torch.finfo(X.dtype).tiny)
    scale = clip * amax / 127.0
    q = torch.round(X / scale[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def _dq(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale[:, None]


def quantize_factors(A: torch.Tensor, B: torch.Tensor, G: torch.Tensor | None = None,
                     clips: tuple[float, ...] = CLIPS) -> Int8Factors:
    """Int8 factors of ``W ≈ A B`` (A (N, R), B (R, K), float64) weighted by the Gram G (K, K)."""
    A, B = A.double(), B.double()
    G = torch.eye(B.shape[1], dtype=B.dtype, device=B.device) if G is None else G.double()
    AtA = A.t() @ A

    def err_v(c: float) -> float:
        dB = B - _dq(*quantize_rows(B, c))
        return float(((AtA @ dB) * (dB @ G)).sum())

    clip_v = min(clips, key=err_v)
    vt, vt_scale = quantize_rows(B, clip_v)
    Bq = _dq(vt, vt_scale)
    H = Bq @ G @ Bq.t()

    def err_u(c: float) -> float:
        dA = A - _dq(*quantize_rows(A, c))
        return float(((dA @ H) * dA).sum())

    clip_u = min(clips, key=err_u)
    u, u_scale = quantize_rows(A, clip_u)
    Aq = _dq(u, u_scale)
    BG = B @ G
    ref = float((AtA * (BG @ B.t())).sum())  # tr(AᵀA B G Bᵀ)
    cross = float(((Aq.t() @ A) * (Bq @ BG.t())).sum())  # tr(A_qᵀA B G B_qᵀ)
    qq = float(((Aq.t() @ Aq) * H).sum())  # tr(A_qᵀA_q B_q G B_qᵀ)
    err = max(ref - 2.0 * cross + qq, 0.0)
    return Int8Factors(u, u_scale, vt, vt_scale, clip_u, clip_v,
                       err / ref if ref > 0 else 0.0)
