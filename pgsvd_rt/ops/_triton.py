"""Registers the Triton kernels of kernels/ as the CUDA backend of the ``pgsvd`` ops.

Plain ``Library.IMPL`` + ``register_kernel`` (not ``torch.library.triton_op``, which breaks
``torch.compile`` on CPU-only machines). The kernels themselves run on CPU too under
``TRITON_INTERPRET=1``; tests call them directly there, the dispatcher only routes CUDA tensors.

Per call, ``lowrank_matmul`` and ``lowrank_matmul_grouped`` (and so ``lowrank_matmul_merged``)
run either the fused kernel or two cuBLAS GEMMs, as the measured table of
:mod:`pgsvd_rt.ops.cuda_policy` says for the device, dtype, M bucket and rank (the only place
that choice is made; fused where the table says nothing). The int8 op is always fused.
"""

from __future__ import annotations

import math

import torch

from pgsvd_rt.ops import cuda_policy
from pgsvd_rt.ops._library import (
    check_lowrank_matmul_args,
    check_lowrank_matmul_grouped_args,
    check_lowrank_matmul_int8_args,
)

_lib = torch.library.Library("pgsvd", "IMPL")  # noqa: TOR901 - backend registrations only
_FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_registered = False


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K), a view whenever the strides allow (the kernel takes any strides).
    M from the leading dims, not -1: with K = 0 there are no elements to infer it from."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _two_gemms_grouped(x2, us, v_cat, biases):
    """The cuBLAS path: t = x2 @ v_cat (x read once for every group), then for each group
    y_g = t[:, R-range of g] @ u_g.T + bias_g in one addmm (a strided view of t, no copy). t is
    rounded to x's dtype between the GEMMs, as the fused kernel rounds it.

    Args: x2 (M, K); us G tensors (N_g, R_g); v_cat (K, sum R_g); biases G entries (N_g,) or None.
    Returns: G tensors (M, N_g), contiguous, x2's dtype.
    """
    t = torch.mm(x2, v_cat)
    ys, r0 = [], 0
    for u, b in zip(us, biases, strict=True):
        t_g = t[:, r0:r0 + u.shape[1]]
        r0 += u.shape[1]
        ys.append(torch.mm(t_g, u.t()) if b is None else torch.addmm(b, t_g, u.t()))
    return ys


def _lowrank_matmul_cuda(x, u, v, bias=None):
    from pgsvd_rt.kernels.lowrank_matmul import lowrank_matmul_triton
    from pgsvd_rt.ops import reference

    check_lowrank_matmul_args(x, u, v, bias)
    if x.dtype not in _FAST_DTYPES:  # e.g. float64: the reference is exact and fast enough
        return reference.lowrank_matmul(x, u, v, bias)
    x2 = _as_2d(x)
    if cuda_policy.path(x.device, x.dtype, x2.shape[0], v.shape[1]) == cuda_policy.CUBLAS:
        y = _two_gemms_grouped(x2, [u], v, [bias])[0]
    else:
        y = lowrank_matmul_triton(x2, u, v, bias)
    return y.view(*x.shape[:-1], u.shape[0])


def _lowrank_matmul_grouped_cuda(x, us, v_cat, bias_cat=None):
    from pgsvd_rt.kernels.lowrank_matmul import lowrank_matmul_grouped_triton
    from pgsvd_rt.ops._library import _lowrank_matmul_grouped_default, split_bias

    check_lowrank_matmul_grouped_args(x, us, v_cat, bias_cat)
    if x.dtype not in _FAST_DTYPES:
        return _lowrank_matmul_grouped_default(x, us, v_cat, bias_cat)
    x2 = _as_2d(x)
    if cuda_policy.path(x.device, x.dtype, x2.shape[0], v_cat.shape[1]) == cuda_policy.CUBLAS:
        ys = _two_gemms_grouped(x2, list(us), v_cat, split_bias(us, bias_cat))
    else:
        ys = lowrank_matmul_grouped_triton(x2, list(us), v_cat, split_bias(us, bias_cat))
    return [y.view(*x.shape[:-1], u.shape[0]) for y, u in zip(ys, us, strict=True)]


def _lowrank_matmul_int8_cuda(x, u, u_scale, vt, vt_scale, bias=None):
    from pgsvd_rt.kernels.lowrank_matmul import lowrank_matmul_int8_triton
    from pgsvd_rt.ops import reference

    check_lowrank_matmul_int8_args(x, u, u_scale, vt, vt_scale, bias)
    if x.dtype not in _FAST_DTYPES:
        return reference.lowrank_matmul_int8(x, u, u_scale, vt, vt_scale, bias)
    y = lowrank_matmul_int8_triton(_as_2d(x), u.contiguous(), u_scale, vt, vt_scale, bias)
    return y.view(*x.shape[:-1], u.shape[0])


def register() -> bool:
    """Register the CUDA kernels once; False (the default kernels serve) when Triton is absent.

    Raises nothing for a missing or broken Triton: ``ImportError`` means "not available" and the
    caller (:mod:`pgsvd_rt.ops._backends`) logs it once.
    """
    global _registered
    if _registered:
        return True
    try:
        import triton  # noqa: F401

        import pgsvd_rt.kernels.lowrank_matmul  # noqa: F401  (compiles nothing at import)
    except ImportError:
        return False
    torch.library.register_kernel("pgsvd::lowrank_matmul", "cuda", _lowrank_matmul_cuda, lib=_lib)
    torch.library.register_kernel(
        "pgsvd::lowrank_matmul_grouped", "cuda", _lowrank_matmul_grouped_cuda, lib=_lib
    )
    torch.library.register_kernel(
        "pgsvd::lowrank_matmul_int8", "cuda", _lowrank_matmul_int8_cuda, lib=_lib
    )
    _registered = True
    return True
