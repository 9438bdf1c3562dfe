"""Grouped low-rank projections: q/k/v (or gate/up) that share an input run as ONE launch.

``GroupedLowRankLinear`` concatenates the v factors of G :class:`LowRankLinear` layers along R
(``v_cat`` (K, R_1 + ... + R_G)) and computes every output with
``torch.ops.pgsvd.lowrank_matmul_grouped``: x is read once and one kernel writes all G outputs.

How it plugs into an unmodified HF model (no monkey-patching): the attention block still calls
``self.q_proj(h)``, ``self.k_proj(h)``, ``self.v_proj(h)`` one after the other. Each of those
becomes a :class:`GroupMember` (index g into the group). The first member called computes all G
outputs and the group keeps them for *that very input*: later members called with the same
tensor object (checked by identity through a weak reference, plus its version counter, data
pointer, shape, strides and grad mode) get their cached output; anything else recomputes. The
cache is dropped as soon as every member has been served once, so it never holds activations
across layers or steps. Under ``torch.compile`` (tracing) members run their own slice with
``lowrank_matmul`` instead, which is stateless and graph-friendly.

Group after loading a model, for serving: grouped modules are not ``LowRankLinear``, and the
state dict keys change (``<block>.qkv_group.{v_cat,bias_cat,us.<g>}``). The serving transforms
that must run before grouping (:func:`pad_ranks_`) live here too, so this module builds on
:mod:`pgsvd_rt.nn.lowrank` and the single layer never needs to know about groups.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from pgsvd_rt import ops
from pgsvd_rt.nn.lowrank import LowRankLinear

log = logging.getLogger("pgsvd_rt")

_GROUPS = (
    ("qkv_group", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_group", ("gate_proj", "up_proj")),
)


class GroupedLowRankLinear(nn.Module):
    """G low-rank projections of one input: y_g = (x @ v_cat[:, R-range g]) @ u_g.T + bias_g.

    Attributes:
        us: ParameterList of G left factors (N_g, R_g); the very Parameters of the source layers.
        v_cat: (K, sum R_g) parameter, the right factors concatenated along R.
        bias_cat: (sum N_g,) parameter, the biases concatenated (zeros for a layer without
            one), or None when no layer has a bias.
    """

    def __init__(self, layers: Sequence[LowRankLinear]) -> None:
        super().__init__()
        layers = list(layers)
        if not layers or not all(isinstance(m, LowRankLinear) for m in layers):
            raise TypeError(
                "GroupedLowRankLinear: need a non-empty list of LowRankLinear, got "
                f"{[type(m).__name__ for m in layers]}"
            )
        ks = {m.in_features for m in layers}
        kinds = {(m.u.dtype, m.u.device) for m in layers}
        if len(ks) != 1 or len(kinds) != 1:
            raise ValueError(
                f"GroupedLowRankLinear: layers must share in_features, dtype and device; got "
                f"in_features {sorted(ks)}, dtype/device {sorted(map(str, kinds))}"
            )
        self.in_features = layers[0].in_features
        self.out_features = [m.out_features for m in layers]
        self.ranks = [m.rank for m in layers]
        self.us = nn.ParameterList([m.u for m in layers])
        self.v_cat = nn.Parameter(
            torch.cat([m.v.detach() for m in layers], dim=1),
            requires_grad=any(m.v.requires_grad for m in layers),
        )
        if any(m.bias is not None for m in layers):
            self.bias_cat = nn.Parameter(torch.cat([
                m.bias.detach() if m.bias is not None else m.u.new_zeros(m.out_features)
                for m in layers
            ]), requires_grad=any(m.bias is not None and m.bias.requires_grad for m in layers))
        else:
            self.bias_cat = None
        self._members = [GroupMember(self, g) for g in range(len(layers))]
        self._clear_cache()

    def bias_slice(self, g: int) -> torch.Tensor | None:
        """(N_g,) view of bias_cat belonging to group g, or None."""
        if self.bias_cat is None:
            return None
        n0 = sum(self.out_features[:g])
        return self.bias_cat[n0:n0 + self.out_features[g]]

    def v_slice(self, g: int) -> torch.Tensor:
        """(K, R_g) view of v_cat belonging to group g."""
        r0 = sum(self.ranks[:g])
        return self.v_cat[:, r0:r0 + self.ranks[g]]

    def members(self) -> list[GroupMember]:
        """One module per source layer, to put where the source layers were."""
        return list(self._members)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (..., K) -> G tensors (..., N_g), one fused launch where a fast backend exists."""
        return ops.lowrank_matmul_grouped(x, list(self.us), self.v_cat, self.bias_cat)

    # -- the per-input cache used by the members ---------------------------------------------
    def _clear_cache(self) -> None:
        self._cache_x: weakref.ref | None = None
        self._cache_key: tuple | None = None
        self._cache_out: list[torch.Tensor] | None = None
        self._served: set[int] = set()

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        try:
            version = x._version
        except RuntimeError:  # inference tensors have no version counter
            version = None
        return (version, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device,
                torch.is_grad_enabled())

    def member_output(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """Output g for input x, computing all G outputs at most once per input tensor."""
        if torch.compiler.is_compiling():
            return ops.lowrank_matmul(x, self.us[g], self.v_slice(g), self.bias_slice(g))
        cached_x = self._cache_x() if self._cache_x is not None else None
        if cached_x is not x or self._cache_key != self._key(x) or g in self._served:
            self._clear_cache()
            self._cache_out = self.forward(x)
            self._cache_x = weakref.ref(x)
            self._cache_key = self._key(x)
        out = self._cache_out[g]
        self._served.add(g)
        if len(self._served) == len(self.ranks):
            self._clear_cache()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"ranks={self.ranks}")


class GroupMember(nn.Module):
    """Stands in for one source layer of a :class:`GroupedLowRankLinear` (output ``index``).

    Holds no parameters; the group is registered on the parent block, not under the member.
    """

    def __init__(self, group: GroupedLowRankLinear, index: int) -> None:
        super().__init__()
        self.__dict__["group"] = group  # a plain reference: not a submodule of the member
        self.index = index
        self.in_features = group.in_features
        self.out_features = group.out_features[index]
        self.rank = group.ranks[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.member_output(self.index, x)

    def extra_repr(self) -> str:
        return (f"index={self.index}, in_features={self.in_features}, "
                f"out_features={self.out_features}, rank={self.rank}")


def pad_ranks_(model: nn.Module, multiple: int = 16) -> nn.Module:
    """:meth:`LowRankLinear.pad_rank_` on every LowRankLinear of ``model``; returns ``model``.

    A serving transform: apply it after loading and before :func:`group_projections_` (groups
    concatenate the factors as they are then). A model saved afterwards stores the padded ranks.

    Raises:
        ValueError: ``model`` already has grouped projections (their factors would stay as
            they are).
    """
    grouped = [n for n, m in model.named_modules() if isinstance(m, GroupedLowRankLinear)]
    if grouped:
        raise ValueError(f"pad_ranks_: call it before group_projections_; {grouped[0]!r} and "
                         f"{len(grouped) - 1} more are already grouped")
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.pad_rank_(multiple)
    return model


def group_projections_(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up of every block whose projections are all LowRankLinear, in place.

    A block is any submodule with attributes ``q_proj, k_proj, v_proj`` (LLaMA/Mistral/Qwen-style
    attention) or ``gate_proj, up_proj`` (gated MLP); the group is registered on that block as
    ``qkv_group`` / ``gate_up_group`` and the projections are replaced by :class:`GroupMember`.
    Blocks with any dense projection, or with mixed dtypes/devices, are left alone.

    Returns:
        ``model`` (modified in place).
    """
    n = 0
    for block in list(model.modules()):
        for group_name, names in _GROUPS:
            layers = [getattr(block, name, None) for name in names]
            if not all(isinstance(m, LowRankLinear) for m in layers):
                continue
            if len({(m.in_features, m.u.dtype, m.u.device) for m in layers}) != 1:
                continue
            group = GroupedLowRankLinear(layers)
            setattr(block, group_name, group)
            for name, member in zip(names, group.members(), strict=True):
                setattr(block, name, member)
            n += 1
    log.info("group_projections_: fused %d projection groups", n)
    return model
