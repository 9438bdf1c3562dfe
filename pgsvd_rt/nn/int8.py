"""LowRankLinearInt8: W ≈ u @ v.T with both factors in int8, served without dequantising."""

from __future__ import annotations

import torch
from torch import nn

from pgsvd_rt import ops

#: R is padded to a multiple of this (zero ranks, exact): torch's half/bf16 int8 GEMM needs it.
RANK_ALIGN = 16


class LowRankLinearInt8(nn.Module):
    """y = ((x @ vt.T) * vt_scale) @ u.T * u_scale + bias (``pgsvd::lowrank_matmul_int8``).

    Attributes (buffers: int8 factors are not trained):
        u: (out_features, R) int8; u_scale: (out_features,), one scale per row.
        vt: (R, in_features) int8 (``v`` transposed); vt_scale: (R,), one scale per rank.
        bias: (out_features,) parameter or None.
        rank: R including zero padding to :data:`RANK_ALIGN`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankLinearInt8: {name} must be a positive int, "
                                 f"got {value!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("u", torch.empty(out_features, rank, dtype=torch.int8,
                                              device=device))
        self.register_buffer("u_scale", torch.empty(out_features, **kw))
        self.register_buffer("vt", torch.empty(rank, in_features, dtype=torch.int8,
                                               device=device))
        self.register_buffer("vt_scale", torch.empty(rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_quantized(cls, u: torch.Tensor, u_scale: torch.Tensor, vt: torch.Tensor,
                       vt_scale: torch.Tensor, bias: torch.Tensor | None,
                       dtype: torch.dtype) -> LowRankLinearInt8:
        """From int8 factors and their scales; R zero-padded to :data:`RANK_ALIGN`."""
        pad = -u.shape[1] % RANK_ALIGN
        if pad:
            u = torch.nn.functional.pad(u, (0, pad))
            vt = torch.nn.functional.pad(vt, (0, 0, 0, pad))
            vt_scale = torch.nn.functional.pad(vt_scale, (0, pad), value=1.0)
        mod = cls(vt.shape[1], u.shape[0], u.shape[1], bias=bias is not None, device=u.device,
                  dtype=dtype)
        with torch.no_grad():
            mod.u.copy_(u)
            mod.vt.copy_(vt)
            mod.u_scale.copy_(u_scale)
            mod.vt_scale.copy_(vt_scale)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lowrank_matmul_int8(x, self.u, self.u_scale, self.vt, self.vt_scale,
                                       self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, int8, bias={self.bias is not None}")
