"""LowRankLinear: a drop-in for nn.Linear holding W ≈ u @ v.T, and the recursive module swap."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from pgsvd_rt import ops


class LowRankLinear(nn.Module):
    """y = (x @ v) @ u.T + bias, computed by ``torch.ops.pgsvd.lowrank_matmul``.

    Attributes:
        u: (out_features, R) parameter, the ``A`` of ``W ≈ A B``.
        v: (in_features, R) parameter, ``Bᵀ`` (both factors row-major in R).
        bias: (out_features,) parameter or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankLinear: {name} must be a positive int, got {value!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Build from ``A`` (N, R) and ``B`` (R, M); values cast to ``dtype`` (default A's)."""
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"from_factors: need A (N, R), B (R, M); got {tuple(A.shape)}, "
                             f"{tuple(B.shape)}")
        dtype = dtype or A.dtype
        (N, R), M = A.shape, B.shape[1]
        mod = cls(M, N, R, bias=bias is not None, device=A.device, dtype=dtype)
        with torch.no_grad():
            mod.u.copy_(A)
            mod.v.copy_(B.t())
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The (out_features, in_features) product u @ v.T (for analysis, not for serving)."""
        return self.u @ self.v.t()

    @torch.no_grad()
    def pad_rank_(self, multiple: int) -> LowRankLinear:
        """Zero-pad u and v along R to the next multiple of ``multiple``, in place; exact.

        The padded columns are zeros in both factors, so ``u @ v.T`` and every output are
        unchanged. Why: the fused kernel vectorises its loads of u and v only when R (the
        factors' row stride) is a multiple of 16; at an arbitrary PGSVD rank it falls back to
        2-byte loads and several of its prefill configs spill registers (compiled resources:
        benchmarks/kernel_resources.py). Costs (R' - R) * (in_features + out_features) elements.
        ``rank`` becomes the padded rank. Returns ``self``.
        """
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"pad_rank_: multiple must be a positive int, got {multiple!r}")
        pad = -self.rank % multiple
        if pad:
            self.u = nn.Parameter(nn.functional.pad(self.u, (0, pad)),
                                  requires_grad=self.u.requires_grad)
            self.v = nn.Parameter(nn.functional.pad(self.v, (0, pad)),
                                  requires_grad=self.v.requires_grad)
            self.rank += pad
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.lowrank_matmul(x, self.u, self.v, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def replace_linear(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Swap the submodules named in ``replacements`` (dotted paths) in place; returns ``model``.

    Raises:
        KeyError: a name that is not a submodule of ``model``.
    """
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, child):
            raise KeyError(f"replace_linear: {name!r} is not a submodule of the model")
        setattr(parent, child, new)
    return model
