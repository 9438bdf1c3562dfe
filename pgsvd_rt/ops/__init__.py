"""The ops contract of pgsvd_rt: typed wrappers over ``torch.ops.pgsvd.*``.

Model code (``nn/``, ``compress/``) calls these wrappers, never ``kernels/`` or ``_C`` directly;
the dispatcher picks the backend from the tensors' device.

Owners (op × backend):

======================  ===========================  ==========================  ===================
op                      default (any device)         CPU                         CUDA
======================  ===========================  ==========================  ===================
lowrank_matmul          ops/reference.py             csrc/lowrank_matmul_cpu.cpp kernels/ (Triton)
lowrank_matmul_grouped  ops/_library.py (per group)  csrc/lowrank_matmul_cpu.cpp kernels/ (Triton)
lowrank_matmul_merged   ops/_library.py (grouped,    csrc/lowrank_matmul_cpu.cpp grouped (Triton),
                        concatenated)                                            concatenated
als_solve               ops/reference.py             csrc/als_solve.cpp          csrc/als_solve.cpp
lowrank_matmul_int8     ops/reference.py             torch's int8 weight-only    kernels/ (Triton,
                                                     GEMM (ops/_library.py)      int8 loads)
======================  ===========================  ==========================  ===================

Triton kernels live in kernels/lowrank_matmul.py; csrc/als_solve.cpp serves CUDA through ATen
when built as a CUDAExtension (a CUDA build of torch). The CPU kernels of lowrank_matmul run a
one-pass AVX-512 kernel for bf16 decode and library GEMMs otherwise (the measured policy is in
the header of csrc/lowrank_matmul_cpu.cpp). The autograd formula is registered in Python
(:mod:`pgsvd_rt.ops._library`); the wrappers below skip it when grad mode is off (it would only
redispatch, at about 9 µs a call on a CPU).

A missing backend (no Triton, no compiled extension) is logged once and the default serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgsvd_rt.ops import (
    _backends,
    _library,  # noqa: F401  (defines the schemas)
    packed,
)

_backends.load_all()
_LOWRANK = torch.ops.pgsvd.lowrank_matmul.default
_GROUPED = torch.ops.pgsvd.lowrank_matmul_grouped.default
_MERGED = torch.ops.pgsvd.lowrank_matmul_merged.default
_INT8 = torch.ops.pgsvd.lowrank_matmul_int8.default
_PACKED = torch.ops.pgsvd.lowrank_matmul_packed.default


def _call(op, *args):
    """op(*args), skipping the autograd kernel (Python, ~9 µs a call on a CPU) where it would
    only redispatch: under inference mode (vLLM runs the model in it) the dispatcher already
    leaves it out, and a direct call is cheapest (~2 µs less than the guard below); with grad
    mode off, go below it as it would. Not while tracing (torch.compile sees the op as usual;
    it cannot trace the inference-mode query, so that is asked second)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return op(*args)
    if not torch.is_grad_enabled():
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def lowrank_matmul(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = (x @ v) @ u.T + bias in one fused launch where a fast backend exists.

    Args:
        x: (..., K) activations, fp16 / bf16 / fp32.
        u: (N, R) left factor, x's dtype and device.
        v: (K, R) right factor (transposed ``B``), x's dtype and device.
        bias: (N,) or None.

    Returns:
        (..., N) tensor in x's dtype.
    """
    return _call(_LOWRANK, x, u, v, bias)


def als_solve(
    W: torch.Tensor,
    G: torch.Tensor,
    A0: torch.Tensor,
    B0: torch.Tensor,
    iters: int = 10,
    ridge: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ALS for ``min ‖(W − A B) X‖_F`` (see :func:`pgsvd_rt.ops.reference.als_solve`).

    Args:
        W: (Bt, N, M) float32/float64.
        G: (Bt, M, M), or (1, M, M) shared by the batch.
        A0: (Bt, N, R); B0: (Bt, R, M).
        iters: ALS iterations; ridge: relative shift where an r×r Cholesky fails.

    Returns:
        (A, B): (Bt, N, R), (Bt, R, M).
    """
    return torch.ops.pgsvd.als_solve(W, G, A0, B0, int(iters), float(ridge))


def native_available() -> bool:
    """True when the compiled extension ``pgsvd_rt._C`` registered its kernels."""
    return _backends.NATIVE_LOADED


def decode_layout(v: torch.Tensor) -> torch.Tensor:
    """v (K, R) laid out as this machine's decode kernels read it fastest, for a model that only
    serves (an engine's weights after loading): where the CPU decode kernels of v's dtype take
    v.T (``csrc/lowrank_decode_cpu.h``, ``v_transposed``), a (K, R) view of a contiguous (R, K)
    copy; anything else is returned as is. Every op takes either layout (the library GEMMs read
    both); where the decode kernels do not take v.T they copy it per call.
    """
    if (v.dim() == 2 and v.device.type == "cpu" and v.dtype in (torch.float32, torch.bfloat16)
            and _backends.NATIVE_LOADED):
        from pgsvd_rt.ops import _native

        if _native.module.decode_v_transposed(v.dtype == torch.bfloat16):
            return v.t().contiguous().t()
    return v


def lowrank_matmul_grouped(
    x: torch.Tensor,
    us: list[torch.Tensor],
    v_cat: torch.Tensor,
    bias_cat: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Projections sharing one input in one launch: y_g = (x @ v_g) @ us[g].T + bias_g.

    Args:
        x: (..., K) activations, fp16 / bf16 / fp32.
        us: G left factors (N_g, R_g), x's dtype and device.
        v_cat: (K, R_1 + ... + R_G), the right factors concatenated along R (x is read once).
        bias_cat: (N_1 + ... + N_G,) biases concatenated (zeros for a group without), or None.

    Returns:
        G tensors (..., N_g) in x's dtype.
    """
    return _call(_GROUPED, x, list(us), v_cat, bias_cat)


def lowrank_matmul_merged(
    x: torch.Tensor,
    us: list[torch.Tensor],
    v_cat: torch.Tensor,
    bias_cat: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`lowrank_matmul_grouped` with the outputs side by side in one tensor, as an
    engine's merged layer (q/k/v, gate/up) returns them; same arguments.

    Returns:
        (..., N_1 + ... + N_G) in x's dtype: ``torch.cat(lowrank_matmul_grouped(...), -1)``.
    """
    return _call(_MERGED, x, list(us), v_cat, bias_cat)


@dataclass(frozen=True, eq=False)
class PackedFactors:
    """One layer's factors packed for serving (:mod:`pgsvd_rt.ops.packed`).

    Attributes:
        w: the packed 1-D tensor.
        ns, rs: each group's N and R, in the order of the output's columns.
    """

    w: torch.Tensor
    ns: tuple[int, ...]
    rs: tuple[int, ...]


def packed_kernels(dtype: torch.dtype) -> bool:
    """True when this CPU has kernels for factors of ``dtype`` packed by :func:`pack_factors`."""
    if dtype not in (torch.float32, torch.bfloat16) or not _backends.NATIVE_LOADED:
        return False
    from pgsvd_rt.ops import _native

    return bool(_native.module.packed_kernels(dtype == torch.bfloat16))


def pack_factors(us: list[torch.Tensor], v_cat: torch.Tensor) -> PackedFactors | None:
    """The factors of one (merged) layer packed for :func:`lowrank_matmul_packed`, where this
    machine has packed kernels for them (CPU, bf16 or fp32, the native extension built, a CPU
    the kernels run on); None otherwise (serve with the unpacked ops).

    Args:
        us: G left factors (N_g, R_g).
        v_cat: (K, R_1 + ... + R_G), the right factors side by side.
    """
    if v_cat.device.type != "cpu" or not packed_kernels(v_cat.dtype):
        return None
    return PackedFactors(packed.pack(list(us), v_cat), tuple(int(u.shape[0]) for u in us),
                         tuple(int(u.shape[1]) for u in us))


def lowrank_matmul_packed(x: torch.Tensor, p: PackedFactors,
                          bias_cat: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lowrank_matmul_merged` on factors packed by :func:`pack_factors` (inference).

    Args:
        x: (..., K) activations, the factors' dtype.
        p: the packed factors.
        bias_cat: (N_1 + ... + N_G,) or None.

    Returns:
        (..., N_1 + ... + N_G) in x's dtype.
    """
    return _call(_PACKED, x, p.w, list(p.ns), list(p.rs), bias_cat)


def lowrank_matmul_int8(
    x: torch.Tensor, u: torch.Tensor, u_scale: torch.Tensor, vt: torch.Tensor,
    vt_scale: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x @ vt.T) * vt_scale) @ u.T * u_scale + bias with int8 factors (inference).

    Args:
        x: (..., K) activations, fp16 / bf16 / fp32.
        u: (N, R) int8; u_scale: (N,) in x's dtype.
        vt: (R, K) int8 (``v`` transposed, so each rank is a row); vt_scale: (R,) in x's dtype.
        bias: (N,) or None.

    Returns:
        (..., N) in x's dtype.
    """
    return _INT8(x, u, u_scale, vt, vt_scale, bias)


__all__ = ["lowrank_matmul", "lowrank_matmul_grouped", "lowrank_matmul_merged",
           "lowrank_matmul_packed", "lowrank_matmul_int8", "als_solve", "native_available",
           "decode_layout", "pack_factors", "packed_kernels", "PackedFactors"]
