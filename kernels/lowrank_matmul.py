"""Fused low-rank matmul ``y = (x @ v) @ u.T + bias`` in ONE Triton launch (plain and grouped).

Shapes (letters as everywhere in pgsvd_rt): x (M, K) any strides, v (K, R) any strides, u (N, R),
bias (N,) or None, y (M, N) contiguous in x's dtype. fp16 / bf16 / fp32 inputs; every dot
accumulates in fp32 and the result is cast on store.

Algorithm: one launch, two phases, dynamic tickets (no grid barrier)
--------------------------------------------------------------------
The launch has exactly ``n1 + n2`` programs. Each program first takes a *ticket* from a global
atomic counter; the ticket, not ``program_id``, names its work item, so tickets are handed out in
the order programs actually start running.

* Tickets ``[0, n1)`` are phase-1 items ``(m_tile, r_tile, k_split)``: compute
  ``t[m_tile, r_tile] = x[m_tile, k-range] @ v[k-range, r_tile]`` (fp32) and store it to a global
  fp32 workspace ``t_ws`` (SPLIT_K, M, R) (lives in L2 at decode sizes), then bump the
  per-row-tile arrival counter ``done[m_tile]`` with release semantics.
* Tickets ``[n1, n1 + n2)`` are phase-2 items ``(m_tile, group, n_tile)``: wait (acquire) until
  ``done[m_tile]`` has all ``n_rtiles * SPLIT_K`` arrivals, then compute
  ``y[m_tile, n_tile] = sum_ks t_ws[ks, m_tile, :] (cast to the input dtype, like torch's own
  two-matmul path rounds its intermediate) @ u[n_tile, :].T + bias`` and store it cast to y's
  dtype. No atomics touch y, so any dtype is written directly.

Why it never deadlocks: a phase-2 program waits only for items whose tickets are smaller than its
own; those were taken by programs that are already running, and phase-1 items wait for nothing.
So it needs no co-residency of the whole grid (unlike a grid barrier), and under
``TRITON_INTERPRET=1`` (programs run one after the other) every phase-1 item has finished before
the first phase-2 item starts: the CPU tests run the very same code with many programs.

Each factor is read from memory once: every ``v[k, r]`` belongs to exactly one phase-1 item and
every ``u[n, r]`` to exactly one phase-2 item per row tile; at decode (M <= DECODE_MAX_M: one row
tile) that is once in total. Parallelism at decode comes from R tiles x K splits (phase 1) and N
tiles (phase 2), not from re-reading factors. At prefill the same kernel is two back-to-back GEMMs
in one launch whose (BLOCK_M, R) intermediate round-trips through L2 instead of a second launch;
u is re-read once per row tile, as in any tiled GEMM.

Synchronisation state (one int32 buffer ``[ticket, exited, done[0..n_mtiles)]``) is reset by the
last program to exit, so it is zero again for the next launch on the same stream: no memset
launch. A launch that raises (an interrupted interpreter run, a launch error) may leave it
non-zero, so the launcher drops that buffer and the next launch takes a fresh zeroed one: an
aborted launch can never make a later one spin (a CUDA fault that kills programs part-way
poisons the whole context anyway, so no later launch runs on it). Buffers are cached per (device,
stream); during CUDA-graph capture a fresh zeroed buffer is taken from the graph's pool (a memset
node inside the graph, no extra CPU launch at replay). Limits: replaying one captured graph
concurrently on two streams is unsupported; autotuning runs on the first call per (M bucket, K, N,
R, dtype), so warm up before CUDA-graph capture. Allocations per call: y (one per group) and the
fp32 workspace ``t_ws`` via ``torch.empty``.

Memory traffic and work (ideal, ``elem`` bytes per element):
    bytes = (M*K + K*R + N*R + M*N [+ N for bias]) * elem
    flops = 2*M*R*(K + N)
plus the workspace: SPLIT_K*M*R*4 bytes written once and re-read from L2 once per N tile.

Alignment: the loads of v and u are vectorised (16-byte) only when the compiler can prove their
rows start 16-aligned, i.e. when R (their row stride, and the bound of the R masks) is a multiple
of 16, as it is for x and y when K and N are. At an arbitrary PGSVD rank the factor loads fall
back to 2-byte loads and several prefill configs spill registers (compiled for sm_80/sm_90 by
benchmarks/kernel_resources.py, no GPU needed); ``pgsvd_rt.nn.pad_ranks_`` zero-pads the factors
to R = 16k, which is exact and costs (R' - R)(K + N) elements per layer.

Int8 factors (``lowrank_matmul_int8_triton``, one group): v and u are loaded as int8 and
converted to the input dtype in registers (exact: |q| <= 127); phase 1 scales each column of its
fp32 t tile by ``vt_scale``, phase 2 each output column by ``u_scale``, so the scales never enter
an inner loop and the factor bytes halve against bf16.

Grouped projections (q/k/v, gate/up): ``v_cat`` (K, R_1 + ... + R_G) concatenates the v factors
along R; phase 1 reads x once for all groups, phase 2 applies each ``u_g`` (N_g, R_g) to its own
R-range and writes its own output. Up to MAX_GROUPS groups per launch.
"""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

DECODE_MAX_M = 16
MAX_GROUPS = 4
_SYNC_HEADER: tl.constexpr = tl.constexpr(2)  # ticket, exited (then done[n_mtiles])
_SYNC_HEADER_PY = 2

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(bm, br, bk, bn, sk, warps, stages):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_R": br, "BLOCK_K": bk, "BLOCK_N": bn, "SPLIT_K": sk},
        num_warps=warps, num_stages=stages,
    )


# GPU candidates. Every one compiles for sm_80 and sm_90, fits H100 shared memory (227 KiB) and
# does not spill registers at 16-aligned bf16/fp16 shapes: benchmarks/kernel_resources.py checks
# that on a CPU machine (tests/kernels/test_gpu_compile.py). The autotuner drops, on a smaller
# GPU, a config that does not fit there (the 128x128x128 prefill tile needs 224 KiB).
GPU_DECODE_CONFIGS = [
    _cfg(16, br, bk, bn, sk, w, 3)
    for (br, bk, bn, sk, w) in [
        (16, 256, 64, 1, 4), (32, 256, 64, 1, 4), (16, 128, 32, 2, 4), (32, 128, 64, 2, 4),
        (64, 128, 128, 1, 4), (16, 256, 128, 4, 4), (32, 256, 32, 4, 4), (64, 256, 64, 2, 8),
    ]
]
GPU_PREFILL_CONFIGS = [
    _cfg(bm, br, bk, bn, 1, w, s)
    for (bm, br, bk, bn, w, s) in [
        (128, 128, 64, 128, 8, 3), (64, 128, 64, 128, 4, 3), (128, 64, 64, 128, 8, 4),
        (128, 64, 64, 128, 8, 3), (64, 64, 64, 64, 4, 4),
    ]
]
# Interpreter: exactly one config per path (the autotuner cannot time without a GPU). The decode
# one uses SPLIT_K=2 so CPU tests cover the split-K reduction.
if _INTERPRET:
    _DECODE_CONFIGS = [_cfg(16, 16, 32, 32, 2, 4, 1)]
    _PREFILL_CONFIGS = [_cfg(16, 32, 32, 32, 1, 4, 1)]
else:  # pragma: no cover - GPU only
    _DECODE_CONFIGS, _PREFILL_CONFIGS = GPU_DECODE_CONFIGS, GPU_PREFILL_CONFIGS
_MAX_SPLIT_K = {True: max(c.kwargs["SPLIT_K"] for c in _DECODE_CONFIGS), False: 1}
_MIN_BLOCK_M = 16


@triton.jit
def _phase1_tile(
    x_ptr, v_ptr, vs_ptr, t_ptr, m_tile, r_tile, ks, M, K, R_total,
    stride_xm, stride_xk, stride_vk, stride_vr, split_stride,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INT8: tl.constexpr,
):
    """t_ws[ks, m_tile rows, r_tile cols] = x[rows, k-range of split ks] @ v[k-range, cols]
    (INT8: v is int8, converted in registers, and each column of t scaled by vs[col])."""
    rm = (m_tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = (r_tile * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    m_mask = rm < M
    r_mask = rr < R_total
    n_k = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(n_k, SPLIT_K)
    k_start = ks * per_split * BLOCK_K
    k_end = tl.minimum((ks + 1) * per_split * BLOCK_K, K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = rk < k_end
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        vt = tl.load(v_ptr + rk[:, None] * stride_vk + rr[None, :] * stride_vr,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if INT8:
            vt = vt.to(xt.dtype)  # |q| <= 127: exact in fp16 / bf16 / fp32
        acc = tl.dot(xt, vt, acc, input_precision=DOT_PRECISION)
    if INT8:
        acc = acc * tl.load(vs_ptr + rr, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    t_offs = ks * split_stride + rm[:, None] * R_total + rr[None, :]
    tl.store(t_ptr + t_offs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _phase2_tile(
    t_ptr, u_ptr, us_ptr, b_ptr, y_ptr, m_tile, n_tile, M, N_g, R_g, r_off, R_total,
    split_stride, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INT8: tl.constexpr,
):
    """y_g[rows, cols] = t_ws[:, rows, r_off:r_off+R_g] @ u_g[cols, :].T (+ bias_g[cols])
    (INT8: u_g is int8, converted in registers, and y's column scaled by us[col])."""
    rm = (m_tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (n_tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R_g, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_mask = rr < R_g
        t_offs = rm[:, None] * R_total + (r_off + rr)[None, :]
        t_mask = m_mask[:, None] & r_mask[None, :]
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for ks in tl.static_range(SPLIT_K):
            # .cg: written by other programs of this launch; read from L2, never a stale L1.
            t += tl.load(t_ptr + ks * split_stride + t_offs, mask=t_mask, other=0.0,
                         cache_modifier=".cg")
        ut = tl.load(u_ptr + rn[None, :] * R_g + rr[:, None],  # (BLOCK_R, BLOCK_N) = u.T tile
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if INT8:
            ut = ut.to(y_ptr.dtype.element_ty)
        acc = tl.dot(t.to(ut.dtype), ut, acc, input_precision=DOT_PRECISION)
    if INT8:
        acc = acc * tl.load(us_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_offs = rm[:, None] * N_g + rn[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _lowrank_matmul_kernel(
    x_ptr, v_ptr, t_ptr, sync_ptr, vs_ptr, us_ptr,
    u0_ptr, b0_ptr, y0_ptr, N0, R0,
    u1_ptr, b1_ptr, y1_ptr, N1, R1,
    u2_ptr, b2_ptr, y2_ptr, N2, R2,
    u3_ptr, b3_ptr, y3_ptr, N3, R3,
    M, K, R_total, stride_xm, stride_xk, stride_vk, stride_vr,
    M_BUCKET,  # autotune key only: next power of two of M
    NUM_GROUPS: tl.constexpr,
    HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr,
    HAS_BIAS2: tl.constexpr, HAS_BIAS3: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INT8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One launch of ``n1 + n2`` programs; see the module docstring for the algorithm.

    x (M, K), v (K, R_total) strided; u_g (N_g, R_g) contiguous, R_0 + ... = R_total; y_g (M, N_g)
    contiguous; t_ws (SPLIT_K, M, R_total) fp32; sync int32 [ticket, exited, done[n_mtiles]].
    """
    ticket = tl.atomic_add(sync_ptr, 1)
    n_mt = tl.cdiv(M, BLOCK_M)
    n_rt = tl.cdiv(R_total, BLOCK_R)
    n1 = n_mt * n_rt * SPLIT_K
    T0 = tl.cdiv(N0, BLOCK_N)
    T1 = tl.cdiv(N1, BLOCK_N)
    T2 = tl.cdiv(N2, BLOCK_N)
    T3 = tl.cdiv(N3, BLOCK_N)
    tiles_per_m = T0 + T1 + T2 + T3
    total = n1 + n_mt * tiles_per_m
    split_stride = M * R_total
    if ticket < n1:
        m_tile = ticket // (n_rt * SPLIT_K)
        rem = ticket % (n_rt * SPLIT_K)
        _phase1_tile(x_ptr, v_ptr, vs_ptr, t_ptr, m_tile, rem // SPLIT_K, rem % SPLIT_K, M, K,
                     R_total, stride_xm, stride_xk, stride_vk, stride_vr, split_stride,
                     BLOCK_M, BLOCK_K, BLOCK_R, SPLIT_K, DOT_PRECISION, INT8)
        tl.debug_barrier()  # all threads' stores before the (single-thread) release
        tl.atomic_add(sync_ptr + _SYNC_HEADER + m_tile, 1, sem="release")
    else:
        j = ticket - n1
        m_tile = j // tiles_per_m
        j = j % tiles_per_m
        need = n_rt * SPLIT_K
        arrived = tl.atomic_add(sync_ptr + _SYNC_HEADER + m_tile, 0, sem="acquire")
        while arrived < need:
            arrived = tl.atomic_add(sync_ptr + _SYNC_HEADER + m_tile, 0, sem="acquire")
        tl.debug_barrier()
        if j < T0:
            _phase2_tile(t_ptr, u0_ptr, us_ptr, b0_ptr, y0_ptr, m_tile, j, M, N0, R0, 0, R_total,
                         split_stride, HAS_BIAS0, BLOCK_M, BLOCK_N, BLOCK_R, SPLIT_K,
                         DOT_PRECISION, INT8)
        if NUM_GROUPS > 1:
            if (j >= T0) & (j < T0 + T1):
                _phase2_tile(t_ptr, u1_ptr, us_ptr, b1_ptr, y1_ptr, m_tile, j - T0, M, N1, R1,
                             R0, R_total, split_stride, HAS_BIAS1, BLOCK_M, BLOCK_N, BLOCK_R,
                             SPLIT_K, DOT_PRECISION, False)
        if NUM_GROUPS > 2:
            if (j >= T0 + T1) & (j < T0 + T1 + T2):
                _phase2_tile(t_ptr, u2_ptr, us_ptr, b2_ptr, y2_ptr, m_tile, j - T0 - T1, M, N2,
                             R2, R0 + R1, R_total, split_stride, HAS_BIAS2, BLOCK_M, BLOCK_N,
                             BLOCK_R, SPLIT_K, DOT_PRECISION, False)
        if NUM_GROUPS > 3:
            if j >= T0 + T1 + T2:
                _phase2_tile(t_ptr, u3_ptr, us_ptr, b3_ptr, y3_ptr, m_tile, j - T0 - T1 - T2, M,
                             N3, R3, R0 + R1 + R2, R_total, split_stride, HAS_BIAS3, BLOCK_M,
                             BLOCK_N, BLOCK_R, SPLIT_K, DOT_PRECISION, False)
    # The last program out resets the sync buffer to zero for the next launch on this stream.
    tl.debug_barrier()
    exited = tl.atomic_add(sync_ptr + 1, 1)
    if exited == total - 1:
        for i0 in range(0, n_mt + _SYNC_HEADER, 128):
            offs = i0 + tl.arange(0, 128)
            tl.store(sync_ptr + offs, tl.zeros((128,), dtype=tl.int32),
                     mask=offs < n_mt + _SYNC_HEADER)


_decode_tuned = triton.autotune(
    configs=_DECODE_CONFIGS, key=["M_BUCKET", "K", "R_total", "N0", "N1", "N2", "N3"]
)(_lowrank_matmul_kernel)
_prefill_tuned = triton.autotune(
    configs=_PREFILL_CONFIGS, key=["M_BUCKET", "K", "R_total", "N0", "N1", "N2", "N3"]
)(_lowrank_matmul_kernel)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
_SYNC_CACHE: dict[tuple, torch.Tensor] = {}


def _sync_buffer(device: torch.device, n: int) -> tuple[tuple | None, torch.Tensor]:
    """(cache key, a zeroed int32 buffer of >= n entries) private to (device, current stream);
    on the CPU (the interpreter) private to the calling thread as well. Key None: not cached."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None, torch.zeros(n, dtype=torch.int32, device=device)
        key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, device.index, threading.get_ident())
    buf = _SYNC_CACHE.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
        _SYNC_CACHE[key] = buf
    return key, buf


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dot_precision(dtype: torch.dtype) -> str | None:
    if dtype != torch.float32:
        return None
    # Follow torch's own fp32 matmul policy so the 2x-torch error rule compares like with like.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def lowrank_matmul_grouped_triton(
    x: torch.Tensor,
    us: list[torch.Tensor],
    v_cat: torch.Tensor,
    biases: list[torch.Tensor | None] | None = None,
    config: dict | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """y_g = (x @ v_cat[:, R-range of g]) @ us[g].T + biases[g] for every g, in one launch.

    Args:
        x: (M, K) fp16 / bf16 / fp32, any strides.
        us: G tensors (N_g, R_g), x's dtype; made contiguous (a no-op for parameters).
        v_cat: (K, sum R_g), x's dtype, any strides.
        biases: G entries, each (N_g,) or None; None means no bias anywhere.
        config: tests only. Fixed meta-parameters (BLOCK_M, BLOCK_R, BLOCK_K, BLOCK_N, SPLIT_K,
            optional num_warps) bypassing the autotuner.
        scales: int8 factors (one group only): ``(v_scale (R,), u_scale (N,))``; v_cat and us
            are then int8, converted in registers, and t and y scaled per column.

    Returns:
        G tensors (M, N_g), contiguous, x's dtype. Shapes are the caller's contract (the op
        checks them); G > MAX_GROUPS is split over several launches.
    """
    G = len(us)
    biases = list(biases) if biases is not None else [None] * G
    if scales is not None and G != 1:
        raise ValueError(f"int8 factors take one group, got {G}")
    if G > MAX_GROUPS:
        out, r0 = [], 0
        for g0 in range(0, G, MAX_GROUPS):
            chunk = us[g0:g0 + MAX_GROUPS]
            r1 = r0 + sum(u.shape[1] for u in chunk)
            out += lowrank_matmul_grouped_triton(
                x, chunk, v_cat[:, r0:r1], biases[g0:g0 + MAX_GROUPS], config)
            r0 = r1
        return out
    M, K = x.shape
    R_total = v_cat.shape[1]
    us = [u.contiguous() for u in us]
    biases = [b.contiguous() if b is not None else None for b in biases]
    ys = [torch.empty((M, u.shape[0]), dtype=x.dtype, device=x.device) for u in us]
    if M == 0 or all(y.numel() == 0 for y in ys):
        return ys
    if K == 0:  # empty contraction: y = bias (or 0)
        for y, b in zip(ys, biases, strict=True):
            if b is None:
                y.zero_()
            else:
                y.copy_(b.expand_as(y))
        return ys
    decode = M <= DECODE_MAX_M
    split_k = config["SPLIT_K"] if config else _MAX_SPLIT_K[decode]
    t_ws = torch.empty((split_k, M, R_total), dtype=torch.float32, device=x.device)
    sync_key, sync = _sync_buffer(x.device, _SYNC_HEADER_PY + triton.cdiv(M, _MIN_BLOCK_M))
    group_args = []
    for g in range(MAX_GROUPS):
        gi = min(g, G - 1)
        N_g, R_g = (us[g].shape[0], us[g].shape[1]) if g < G else (0, 0)
        b = biases[gi] if biases[gi] is not None else ys[gi]
        group_args += [us[gi], b, ys[gi], N_g, R_g]
    has_bias = {f"HAS_BIAS{g}": g < G and biases[g] is not None for g in range(MAX_GROUPS)}
    n_list = [u.shape[0] for u in us]

    def grid(meta):
        n_mt = triton.cdiv(M, meta["BLOCK_M"])
        n1 = n_mt * triton.cdiv(R_total, meta["BLOCK_R"]) * meta["SPLIT_K"]
        return (n1 + n_mt * sum(triton.cdiv(n, meta["BLOCK_N"]) for n in n_list),)

    vs, uscale = scales if scales is not None else (t_ws, t_ws)  # unread unless INT8
    args = [x, v_cat, t_ws, sync, vs, uscale, *group_args, M, K, R_total, x.stride(0), x.stride(1),
            v_cat.stride(0), v_cat.stride(1), _next_pow2(M)]
    kwargs = dict(NUM_GROUPS=G, DOT_PRECISION=_dot_precision(x.dtype), INT8=scales is not None,
                  **has_bias)
    try:
        if config is not None:
            _lowrank_matmul_kernel[grid](*args, **kwargs, **config)
        else:
            (_decode_tuned if decode else _prefill_tuned)[grid](*args, **kwargs)
    except BaseException:
        # Some programs may have run and left the buffer non-zero (its reset is the last
        # program's job): never hand it to another launch, whose phase 2 would spin forever.
        _SYNC_CACHE.pop(sync_key, None)
        raise
    return ys


def lowrank_matmul_triton(
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y = (x @ v) @ u.T + bias in one launch (the algorithm is in the module docstring).

    Args:
        x: (M, K) fp16 / bf16 / fp32, any strides.
        u: (N, R), x's dtype. v: (K, R), x's dtype, any strides. bias: (N,) or None.
        config: tests only, see :func:`lowrank_matmul_grouped_triton`.

    Returns:
        (M, N) contiguous, x's dtype.
    """
    return lowrank_matmul_grouped_triton(x, [u], v, [bias], config)[0]


def lowrank_matmul_int8_triton(
    x: torch.Tensor,
    u: torch.Tensor,
    u_scale: torch.Tensor,
    vt: torch.Tensor,
    vt_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y = ((x @ vt.T) * vt_scale) @ u.T * u_scale + bias in one launch, int8 factors read as
    int8 (half the factor bytes of bf16) and converted in registers.

    Args:
        x: (M, K) fp16 / bf16 / fp32. u: (N, R) int8, u_scale (N,). vt: (R, K) int8,
        vt_scale (R,) (scales and bias in x's dtype). config: tests only.
    """
    return lowrank_matmul_grouped_triton(x, [u], vt.t(), [bias], config,
                                         scales=(vt_scale, u_scale))[0]


def lowrank_matmul_bytes_flops(
    M: int, K: int, N: int, R: int, elem: int, bias: bool = False
) -> tuple[int, int]:
    """Ideal (bytes moved, FLOPs) of one fused low-rank matmul; ``elem`` bytes per element.

    bytes = (M*K + K*R + N*R + M*N [+ N]) * elem; flops = 2*M*R*(K + N). The dense layer it
    replaces moves (M*K + N*K + M*N) * elem and does 2*M*N*K.
    """
    return (M * K + K * R + N * R + M * N + (N if bias else 0)) * elem, 2 * M * R * (K + N)
