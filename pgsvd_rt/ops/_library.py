"""Op schemas, fake (meta) kernels, default kernels and autograd: the only torch.library code.

Importing this module defines the ``pgsvd`` namespace. Backends register into it elsewhere
(:mod:`pgsvd_rt.ops._triton`, the C++ extension ``pgsvd_rt._C``); they never redefine schemas.
"""

from __future__ import annotations

import torch

from pgsvd_rt.ops import packed, reference

_lib = torch.library.Library("pgsvd", "DEF")  # noqa: TOR901 - the namespace owner

_lib.define("lowrank_matmul(Tensor x, Tensor u, Tensor v, Tensor? bias=None) -> Tensor")
_lib.define(
    "als_solve(Tensor W, Tensor G, Tensor A0, Tensor B0, int iters, float ridge)"
    " -> (Tensor, Tensor)"
)


# ---------------------------------------------------------------------------------------------
# Input contracts, shared by the fake and the default kernels (backends check again natively).
# ---------------------------------------------------------------------------------------------
def check_lowrank_matmul_args(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if x.dim() < 1:
        raise ValueError(f"lowrank_matmul: x must have at least 1 dim, got shape {tuple(x.shape)}")
    if u.dim() != 2 or v.dim() != 2:
        raise ValueError(
            f"lowrank_matmul: u (N, R) and v (K, R) must be 2-D, got u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}"
        )
    K = x.shape[-1]
    if v.shape[0] != K:
        raise ValueError(f"lowrank_matmul: v has {v.shape[0]} rows but x has K={K} features")
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"lowrank_matmul: rank mismatch, u R={u.shape[1]} vs v R={v.shape[1]}")
    if u.shape[1] < 1:
        raise ValueError(f"lowrank_matmul: rank must be >= 1, got R={u.shape[1]}")
    tensors = {"x": x, "u": u, "v": v} | ({"bias": bias} if bias is not None else {})
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"lowrank_matmul: {name} must be floating point, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"lowrank_matmul: {name} dtype {t.dtype} != x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"lowrank_matmul: {name} on {t.device} but x on {x.device}")
    if bias is not None and tuple(bias.shape) != (u.shape[0],):
        raise ValueError(
            f"lowrank_matmul: bias must have shape ({u.shape[0]},), got {tuple(bias.shape)}"
        )


def check_als_solve_args(
    W: torch.Tensor, G: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, iters: int, ridge: float
) -> None:
    named = {"W": W, "G": G, "A0": A0, "B0": B0}
    for name, t in named.items():
        if t.dim() != 3:
            raise ValueError(f"als_solve: {name} must be 3-D (batched), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"als_solve: {name} must be float32 or float64, got {t.dtype}")
        if t.dtype != W.dtype:
            raise TypeError(f"als_solve: {name} dtype {t.dtype} != W dtype {W.dtype}")
        if t.device != W.device:
            raise ValueError(f"als_solve: {name} on {t.device} but W on {W.device}")
    Bt, N, M = W.shape
    R = A0.shape[2]
    if G.shape[0] not in (1, Bt) or tuple(G.shape[1:]) != (M, M):
        raise ValueError(f"als_solve: G must be ({Bt} or 1, {M}, {M}), got {tuple(G.shape)}")
    if tuple(A0.shape) != (Bt, N, R) or R < 1:
        raise ValueError(f"als_solve: A0 must be ({Bt}, {N}, R>=1), got {tuple(A0.shape)}")
    if tuple(B0.shape) != (Bt, R, M):
        raise ValueError(f"als_solve: B0 must be ({Bt}, {R}, {M}), got {tuple(B0.shape)}")
    if iters < 0:
        raise ValueError(f"als_solve: iters must be >= 0, got {iters}")
    if not ridge >= 0.0:  # also rejects NaN
        raise ValueError(f"als_solve: ridge must be >= 0, got {ridge}")


# ---------------------------------------------------------------------------------------------
# lowrank_matmul
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("pgsvd::lowrank_matmul", lib=_lib)
def _lowrank_matmul_fake(x, u, v, bias=None):
    check_lowrank_matmul_args(x, u, v, bias)
    return x.new_empty((*x.shape[:-1], u.shape[0]))


@torch.library.register_kernel("pgsvd::lowrank_matmul", None, lib=_lib)
def _lowrank_matmul_default(x, u, v, bias=None):
    check_lowrank_matmul_args(x, u, v, bias)
    return reference.lowrank_matmul(x, u, v, bias)


def _lowrank_matmul_setup_context(ctx, inputs, output):
    x, u, v, bias = inputs
    ctx.save_for_backward(x, u, v)
    ctx.has_bias = bias is not None


def _lowrank_matmul_backward(ctx, grad_y):
    x, u, v = ctx.saved_tensors
    K, R = v.shape
    x2 = x.reshape(-1, K)
    g2 = grad_y.reshape(-1, u.shape[0])
    gu = g2 @ u  # (M, R)
    grad_x = torch.ops.pgsvd.lowrank_matmul(grad_y, v, u, None)  # dy @ u @ v.T
    grad_u = g2.t() @ (x2 @ v)
    grad_v = x2.t() @ gu
    grad_b = g2.sum(0) if ctx.has_bias else None
    return grad_x, grad_u, grad_v, grad_b


torch.library.register_autograd(
    "pgsvd::lowrank_matmul",
    _lowrank_matmul_backward,
    setup_context=_lowrank_matmul_setup_context,
    lib=_lib,
)
# Under CPU autocast (bf16: training a factored model in mixed precision, pgsvd_rt.compress.heal)
# the op runs on bf16 inputs, as nn.Linear does; the casts are recorded for autograd.
torch.library.register_autocast("pgsvd::lowrank_matmul", "cpu", torch.bfloat16, lib=_lib)


# ---------------------------------------------------------------------------------------------
# als_solve
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("pgsvd::als_solve", lib=_lib)
def _als_solve_fake(W, G, A0, B0, iters, ridge):
    check_als_solve_args(W, G, A0, B0, iters, ridge)
    return torch.empty_like(A0), torch.empty_like(B0)


@torch.library.register_kernel("pgsvd::als_solve", None, lib=_lib)
def _als_solve_default(W, G, A0, B0, iters, ridge):
    check_als_solve_args(W, G, A0, B0, iters, ridge)
    A, B = reference.als_solve(W, G, A0, B0, iters, ridge)
    return A.contiguous().clone(), B.contiguous().clone()  # outputs never alias inputs


# ---------------------------------------------------------------------------------------------
# lowrank_matmul_grouped: projections sharing one input (q/k/v, gate/up), v factors concatenated
# along R so x is read once: y_g = (x @ v_cat[:, R-range of g]) @ us[g].T + bias_cat[N-range of g].
# One optional bias_cat (sum N_g,) rather than Tensor?[]: torch's autograd for tensor lists cannot
# carry a list that mixes tensors and None.
# ---------------------------------------------------------------------------------------------
_lib.define(
    "lowrank_matmul_grouped(Tensor x, Tensor[] us, Tensor v_cat, Tensor? bias_cat=None) -> Tensor[]"
)


def check_lowrank_matmul_grouped_args(
    x: torch.Tensor,
    us: list[torch.Tensor],
    v_cat: torch.Tensor,
    bias_cat: torch.Tensor | None,
    op: str = "lowrank_matmul_grouped",
) -> None:
    if len(us) < 1:
        raise ValueError(f"{op}: need at least one u, got an empty list")
    if v_cat.dim() != 2:
        raise ValueError(f"{op}: v_cat must be 2-D, got {tuple(v_cat.shape)}")
    ranks = [u.shape[1] if u.dim() == 2 else -1 for u in us]
    if sum(ranks) != v_cat.shape[1]:
        raise ValueError(
            f"{op}: ranks of us {ranks} sum to {sum(ranks)} but v_cat has R={v_cat.shape[1]}"
        )
    n_total = sum(u.shape[0] for u in us)
    if bias_cat is not None and tuple(bias_cat.shape) != (n_total,):
        raise ValueError(
            f"{op}: bias_cat must have shape ({n_total},) (sum of N), got "
            f"{tuple(bias_cat.shape)}"
        )
    for g, (u, v, b) in enumerate(zip(us, split_v(us, v_cat), split_bias(us, bias_cat),
                                      strict=True)):
        try:
            check_lowrank_matmul_args(x, u, v, b)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{op} (group {g}): {exc}") from None


def split_v(us, v_cat):
    """Views (K, R_g) of v_cat, one per group."""
    out, r0 = [], 0
    for u in us:
        out.append(v_cat[:, r0:r0 + u.shape[1]])
        r0 += u.shape[1]
    return out


def split_bias(us, bias_cat):
    """Views (N_g,) of bias_cat, one per group (all None without a bias)."""
    if bias_cat is None:
        return [None] * len(us)
    out, n0 = [], 0
    for u in us:
        out.append(bias_cat[n0:n0 + u.shape[0]])
        n0 += u.shape[0]
    return out


@torch.library.register_fake("pgsvd::lowrank_matmul_grouped", lib=_lib)
def _lowrank_matmul_grouped_fake(x, us, v_cat, bias_cat=None):
    check_lowrank_matmul_grouped_args(x, us, v_cat, bias_cat)
    return [x.new_empty((*x.shape[:-1], u.shape[0])) for u in us]


@torch.library.register_kernel("pgsvd::lowrank_matmul_grouped", None, lib=_lib)
def _lowrank_matmul_grouped_default(x, us, v_cat, bias_cat=None):
    check_lowrank_matmul_grouped_args(x, us, v_cat, bias_cat)
    return [
        reference.lowrank_matmul(x, u, v, b)
        for u, v, b in zip(us, split_v(us, v_cat), split_bias(us, bias_cat), strict=True)
    ]


def _lowrank_matmul_grouped_setup_context(ctx, inputs, output):
    x, us, v_cat, bias_cat = inputs
    ctx.save_for_backward(x, v_cat, *us)
    ctx.has_bias = bias_cat is not None


def _lowrank_matmul_grouped_backward(ctx, grad_ys):
    x, v_cat, *us = ctx.saved_tensors
    x2 = x.reshape(-1, v_cat.shape[0])
    grad_x, grad_us, g2s, gus = None, [], [], []
    for u, v, gy in zip(us, split_v(us, v_cat), grad_ys, strict=True):
        g2 = x2.new_zeros((x2.shape[0], u.shape[0])) if gy is None else gy.reshape(-1, u.shape[0])
        g2s.append(g2)
        gus.append(g2 @ u)  # (M, R_g)
        gx = torch.ops.pgsvd.lowrank_matmul(g2, v, u, None)  # (M, K)
        grad_x = gx if grad_x is None else grad_x + gx
        grad_us.append(g2.t() @ (x2 @ v))
    grad_v = x2.t() @ torch.cat(gus, dim=1)
    grad_b = torch.cat([g.sum(0) for g in g2s]) if ctx.has_bias else None
    if grad_b is None:  # the dispatcher drops an argument equal to its default (bias_cat=None)
        return grad_x.reshape(x.shape), grad_us, grad_v
    return grad_x.reshape(x.shape), grad_us, grad_v, grad_b


torch.library.register_autograd(
    "pgsvd::lowrank_matmul_grouped",
    _lowrank_matmul_grouped_backward,
    setup_context=_lowrank_matmul_grouped_setup_context,
    lib=_lib,
)


# ---------------------------------------------------------------------------------------------
# lowrank_matmul_merged: lowrank_matmul_grouped with the groups' outputs side by side in one
# (..., N_1 + ... + N_G) tensor, as an engine's merged layer (q/k/v, gate/up) returns it: the
# CPU decode kernels write each group's columns in place (no concatenation, one allocation).
# ---------------------------------------------------------------------------------------------
_lib.define(
    "lowrank_matmul_merged(Tensor x, Tensor[] us, Tensor v_cat, Tensor? bias_cat=None) -> Tensor"
)


@torch.library.register_fake("pgsvd::lowrank_matmul_merged", lib=_lib)
def _lowrank_matmul_merged_fake(x, us, v_cat, bias_cat=None):
    check_lowrank_matmul_grouped_args(x, us, v_cat, bias_cat, "lowrank_matmul_merged")
    return x.new_empty((*x.shape[:-1], sum(u.shape[0] for u in us)))


@torch.library.register_kernel("pgsvd::lowrank_matmul_merged", None, lib=_lib)
def _lowrank_matmul_merged_default(x, us, v_cat, bias_cat=None):
    """The grouped op of the tensors' device (Triton on CUDA), concatenated."""
    check_lowrank_matmul_grouped_args(x, us, v_cat, bias_cat, "lowrank_matmul_merged")
    return torch.cat(torch.ops.pgsvd.lowrank_matmul_grouped(x, us, v_cat, bias_cat), -1)


def _lowrank_matmul_merged_backward(ctx, grad_y):
    _, _, *us = ctx.saved_tensors
    grads = grad_y.split([u.shape[0] for u in us], -1)
    return _lowrank_matmul_grouped_backward(ctx, grads)


torch.library.register_autograd(
    "pgsvd::lowrank_matmul_merged",
    _lowrank_matmul_merged_backward,
    setup_context=_lowrank_matmul_grouped_setup_context,
    lib=_lib,
)


# ---------------------------------------------------------------------------------------------
# lowrank_matmul_packed: the groups of lowrank_matmul_merged with their factors packed once for
# serving (pgsvd_rt/ops/packed.py: one 1-D tensor as the CPU kernels' tiles read it). Inference
# only (no autograd: a packed model serves).
# ---------------------------------------------------------------------------------------------
_lib.define(
    "lowrank_matmul_packed(Tensor x, Tensor packed, int[] ns, int[] rs, Tensor? bias_cat=None)"
    " -> Tensor"
)


def check_lowrank_matmul_packed_args(x, w, ns, rs, bias_cat) -> packed.Layout:
    op = "lowrank_matmul_packed"
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have at least 1 dim and K >= 1, got {tuple(x.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: packed dtype {w.dtype} != x dtype {x.dtype}")
    try:
        L = packed.Layout(int(x.shape[-1]), tuple(ns), tuple(rs), packed.kp_of(x.dtype))
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{op}: {exc}") from None
    if w.dim() != 1 or w.numel() != L.numel():
        raise ValueError(f"{op}: expected a 1-D packed tensor of {L.numel()} elements for "
                         f"K={x.shape[-1]}, ns={list(ns)}, rs={list(rs)}; got {tuple(w.shape)}")
    for name, t in (("packed", w), ("bias_cat", bias_cat)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} on {t.device} but x on {x.device}")
    if bias_cat is not None:
        if bias_cat.dtype != x.dtype:
            raise TypeError(f"{op}: bias_cat dtype {bias_cat.dtype} != x dtype {x.dtype}")
        if tuple(bias_cat.shape) != (sum(ns),):
            raise ValueError(f"{op}: bias_cat must have shape ({sum(ns)},) (sum of N), got "
                             f"{tuple(bias_cat.shape)}")
    return L


@torch.library.register_fake("pgsvd::lowrank_matmul_packed", lib=_lib)
def _lowrank_matmul_packed_fake(x, w, ns, rs, bias_cat=None):
    check_lowrank_matmul_packed_args(x, w, ns, rs, bias_cat)
    return x.new_empty((*x.shape[:-1], sum(ns)))


def lowrank_matmul_packed_default(x, w, ns, rs, bias_cat=None):
    """The default kernel (any device): unpacked, then the merged reference."""
    check_lowrank_matmul_packed_args(x, w, ns, rs, bias_cat)
    us, v_cat = packed.unpack(w, int(x.shape[-1]), list(ns), list(rs))
    ys = [reference.lowrank_matmul(x, u, v, b)
          for u, v, b in zip(us, split_v(us, v_cat), split_bias(us, bias_cat), strict=True)]
    return torch.cat(ys, -1) if len(ys) > 1 else ys[0]


torch.library.register_kernel("pgsvd::lowrank_matmul_packed", None, lib=_lib)(
    lowrank_matmul_packed_default)


# ---------------------------------------------------------------------------------------------
# lowrank_matmul_int8: int8 factors with a scale per row of u (N) and per row of vt (R, i.e. per
# column of v). Inference only (no autograd: int8 factors are not trained).
# ---------------------------------------------------------------------------------------------
_lib.define(
    "lowrank_matmul_int8(Tensor x, Tensor u, Tensor u_scale, Tensor vt, Tensor vt_scale,"
    " Tensor? bias=None) -> Tensor"
)


def check_lowrank_matmul_int8_args(x, u, u_scale, vt, vt_scale, bias) -> None:
    op = "lowrank_matmul_int8"
    if x.dim() < 1 or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor with >= 1 dim, got {x.dtype} "
                        f"{tuple(x.shape)}")
    for name, t in (("u", u), ("vt", vt)):
        if t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{op}: {name} must be a 2-D int8 tensor, got {t.dtype} "
                            f"{tuple(t.shape)}")
    (N, R), K = u.shape, x.shape[-1]
    if tuple(vt.shape) != (R, K):
        raise ValueError(f"{op}: vt must be (R, K) = ({R}, {K}) for u {tuple(u.shape)} and x "
                         f"with K={K}, got {tuple(vt.shape)}")
    if R < 1:
        raise ValueError(f"{op}: rank must be >= 1, got R={R}")
    for name, t, n in (("u_scale", u_scale, N), ("vt_scale", vt_scale, R),
                       ("bias", bias, N)):
        if t is None:
            continue
        if tuple(t.shape) != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} != x dtype {x.dtype}")
    for name, t in (("u", u), ("u_scale", u_scale), ("vt", vt), ("vt_scale", vt_scale),
                    ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} on {t.device} but x on {x.device}")


@torch.library.register_fake("pgsvd::lowrank_matmul_int8", lib=_lib)
def _lowrank_matmul_int8_fake(x, u, u_scale, vt, vt_scale, bias=None):
    check_lowrank_matmul_int8_args(x, u, u_scale, vt, vt_scale, bias)
    return x.new_empty((*x.shape[:-1], u.shape[0]))


@torch.library.register_kernel("pgsvd::lowrank_matmul_int8", None, lib=_lib)
def _lowrank_matmul_int8_default(x, u, u_scale, vt, vt_scale, bias=None):
    check_lowrank_matmul_int8_args(x, u, u_scale, vt, vt_scale, bias)
    return reference.lowrank_matmul_int8(x, u, u_scale, vt, vt_scale, bias)


@torch.library.register_kernel("pgsvd::lowrank_matmul_int8", "cpu", lib=_lib)
def _lowrank_matmul_int8_cpu(x, u, u_scale, vt, vt_scale, bias=None):
    """Two calls of torch's int8 weight-only CPU GEMM (``_weight_int8pack_mm``: int8 weights
    converted in registers, one scale per output channel), which is exactly this op's form:
    t = x @ (vt * vt_scale).T, y = t @ (u * u_scale).T. Factors never dequantised in memory."""
    check_lowrank_matmul_int8_args(x, u, u_scale, vt, vt_scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x.dtype != torch.float32 and (x.shape[-1] % 16 or u.shape[1] % 16):
        # torch 2.13's half/bf16 kernel reads past a K that is not a multiple of 16 (it
        # crashes); its fp32 kernel takes any K. LowRankLinearInt8 pads R to 16k, so models
        # with 16k features stay on the half path.
        y = torch._weight_int8pack_mm(torch._weight_int8pack_mm(x2.float(), vt, vt_scale.float()),
                                      u, u_scale.float()).to(x.dtype)
    else:
        y = torch._weight_int8pack_mm(torch._weight_int8pack_mm(x2, vt, vt_scale), u, u_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], u.shape[0])
