"""The packed serving layout of a factored layer: what the CPU GEMM kernels read.

A model that only serves (an engine's weights after loading) packs each linear layer's factors
once into ONE flat tensor, laid out as the CPU kernels' register tiles read it, and calls
``pgsvd::lowrank_matmul_packed`` on it. The unpacked op copies or transposes nothing it could
avoid either, but the tiles need each factor's reduction dimension in ``kp``-element groups
(pairs for bf16's VDPBF16PS, single elements for fp32 FMAs) side by side, 32 output columns a
panel, which no strided view of a (K, R) or (N, R) tensor gives.

Layout, for x (M, K), groups g = 0..G-1 with u_g (N_g, R_g), v_cat (K, R_0 + ... + R_{G-1}):

- ``kp`` = 2 (bf16) or 1 (fp32); ``S = ceil(K / kp)`` reduction steps of stage 1.
- The intermediate t = x @ v_cat keeps group g in columns ``[off_g, off_g + R_g)``, each group
  starting at a multiple of kp (``off_{g+1} = off_g + ceil(R_g / kp) kp``), and is ``Rp`` =
  ``off_G`` rounded up to a multiple of 32 wide; the columns in between are zero (their columns
  of v are).
- V block, (Rp / 32, S, 32, kp): ``V[p, s, c, i] = v_pad[s kp + i, 32 p + c]`` with v_pad (S kp,
  Rp) zero-padded.
- Then for each group, U_g block, (ceil(N_g / 32), S_g, 32, kp) with ``S_g = ceil(R_g / kp)``:
  ``U_g[q, s, c, i] = u_pad[32 q + c, s kp + i]`` with u_pad zero-padded.
- The blocks one after another in one 1-D tensor of the factors' dtype.

Zero padding is exact: a padded column of v gives an exact 0 in t, a padded row or column of u
multiplies nothing that is not zero. This module is the layout's single source of truth in
Python (pack, unpack); csrc/lowrank_packed_cpu.cpp reads it, and the tests hold the two to each
other (tests/ops/test_lowrank_packed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Output columns per panel (two 16-lane vectors of fp32 accumulators).
PANEL = 32


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def kp_of(dtype: torch.dtype) -> int:
    """Elements of the reduction dimension side by side: a bf16 pair, or one fp32."""
    if dtype == torch.bfloat16:
        return 2
    if dtype == torch.float32:
        return 1
    raise TypeError(f"packed layout: dtype must be torch.bfloat16 or torch.float32, got {dtype}")


@dataclass(frozen=True)
class Layout:
    """Offsets of the packed layout of one layer (module docstring)."""

    K: int
    ns: tuple[int, ...]
    rs: tuple[int, ...]
    kp: int

    def __post_init__(self) -> None:
        if self.K < 1 or not self.ns or len(self.ns) != len(self.rs):
            raise ValueError(f"packed layout: need K >= 1 and one rank per group, got K={self.K}, "
                             f"ns={list(self.ns)}, rs={list(self.rs)}")
        if min(self.ns) < 1 or min(self.rs) < 1:
            raise ValueError(f"packed layout: every N and R must be >= 1, got ns={list(self.ns)}, "
                             f"rs={list(self.rs)}")

    @property
    def steps(self) -> int:
        return -(-self.K // self.kp)

    @property
    def offs(self) -> list[int]:
        out = [0]
        for r in self.rs:
            out.append(out[-1] + _ceil(r, self.kp))
        return out

    @property
    def rp(self) -> int:
        return _ceil(self.offs[-1], PANEL)

    def u_shape(self, g: int) -> tuple[int, int, int, int]:
        return (-(-self.ns[g] // PANEL), -(-self.rs[g] // self.kp), PANEL, self.kp)

    @property
    def v_shape(self) -> tuple[int, int, int, int]:
        return (self.rp // PANEL, self.steps, PANEL, self.kp)

    def numel(self) -> int:
        n = self.rp * self.steps * self.kp
        for g in range(len(self.ns)):
            q, s, c, i = self.u_shape(g)
            n += q * s * c * i
        return n


def layout_of(K: int, us: list[torch.Tensor], dtype: torch.dtype) -> Layout:
    return Layout(K, tuple(int(u.shape[0]) for u in us), tuple(int(u.shape[1]) for u in us),
                  kp_of(dtype))


def pack(us: list[torch.Tensor], v_cat: torch.Tensor) -> torch.Tensor:
    """The packed layout of one layer (module docstring), as a new 1-D tensor.

    Args:
        us: G left factors (N_g, R_g).
        v_cat: (K, R_0 + ... + R_{G-1}), the right factors side by side.

    Returns:
        (Layout(...).numel(),) tensor of v_cat's dtype and device.
    """
    K, dtype = int(v_cat.shape[0]), v_cat.dtype
    L = layout_of(K, us, dtype)
    if sum(L.rs) != v_cat.shape[1]:
        raise ValueError(f"packed layout: ranks of us {list(L.rs)} sum to {sum(L.rs)} but v_cat "
                         f"has R={v_cat.shape[1]}")
    kw = {"dtype": dtype, "device": v_cat.device}
    v_pad = torch.zeros(L.steps * L.kp, L.rp, **kw)
    r0 = 0
    for r, off in zip(L.rs, L.offs, strict=False):
        v_pad[:K, off:off + r] = v_cat[:, r0:r0 + r]
        r0 += r
    parts = [v_pad.view(L.steps, L.kp, L.rp // PANEL, PANEL).permute(2, 0, 3, 1).reshape(-1)]
    for g, u in enumerate(us):
        if u.dtype != dtype or u.shape[1] != L.rs[g]:
            raise ValueError(f"packed layout: u[{g}] is {tuple(u.shape)} {u.dtype}, expected "
                             f"(N, {L.rs[g]}) {dtype}")
        q, s, c, i = L.u_shape(g)
        u_pad = torch.zeros(q * c, s * i, **kw)
        u_pad[:u.shape[0], :u.shape[1]] = u
        parts.append(u_pad.view(q, c, s, i).permute(0, 2, 1, 3).reshape(-1))
    return torch.cat(parts)


def unpack(w: torch.Tensor, K: int, ns: list[int], rs: list[int]) -> tuple[list[torch.Tensor],
                                                                             torch.Tensor]:
    """The inverse of :func:`pack`: (us, v_cat) from a packed tensor (copies)."""
    L = Layout(K, tuple(ns), tuple(rs), kp_of(w.dtype))
    if w.dim() != 1 or w.numel() != L.numel():
        raise ValueError(f"packed layout: expected a 1-D tensor of {L.numel()} elements for K={K}, "
                         f"ns={list(ns)}, rs={list(rs)}, {w.dtype}; got shape {tuple(w.shape)}")
    nv = L.rp * L.steps * L.kp
    v_pad = w[:nv].view(L.v_shape).permute(1, 3, 0, 2).reshape(L.steps * L.kp, L.rp)
    v_cat = torch.cat([v_pad[:K, off:off + r] for r, off in zip(L.rs, L.offs, strict=False)], 1)
    us, o = [], nv
    for g in range(len(ns)):
        q, s, c, i = L.u_shape(g)
        blk = w[o:o + q * s * c * i].view(q, s, c, i).permute(0, 2, 1, 3).reshape(q * c, s * i)
        us.append(blk[:ns[g], :rs[g]].contiguous())
        o += q * s * c * i
    return us, v_cat.contiguous()
