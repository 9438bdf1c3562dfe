"""pytest-benchmark suite: fused ``pgsvd::lowrank_matmul`` vs two torch matmuls vs dense F.linear.

    # GPU, the whole grid (5 models' distinct shapes x kappa x M x fp16/bf16):
    python -m pytest benchmarks/test_kernels_bench.py --benchmark-json=kern.json
    # narrower: PGSVD_BENCH_MODELS=llama2-7b PGSVD_BENCH_DTYPES=bf16 PGSVD_BENCH_M=1,4096 ...
    # CPU smoke (CI): tiny shapes, each function run once
    PGSVD_BENCH_SCOPE=smoke python -m pytest benchmarks/test_kernels_bench.py --benchmark-disable

Cases: the distinct (N, K) of LLaMA-2-7B, LLaMA-2-13B, Mistral-7B, Llama-3-8B (GQA k/v; its
linears equal Mistral-7B's) and SmolLM2-135M (benchlib.MODELS); keep ratio kappa in
{0.8, 0.6, 0.4} with R = int(kappa N K / (N + K)); M in {1, 4, 16, 64, 256, 1024, 4096}; fp16 and
bf16. Timing: benchlib.sync_timer (synchronises the GPU before each clock read), fixed
``pedantic`` rounds of enough back-to-back calls to last ~0.5 ms (launch gaps included, no CUDA
graph: bench_lowrank_matmul.py gives the graph-captured decode numbers). Each benchmark carries
its ideal bytes and FLOPs in ``extra_info``; benchmarks/report.py turns the JSON into GB/s,
TFLOP/s, fractions of the ceilings (measured in the same run, conftest.py) and plots.

Scope: on a machine without CUDA the default is the smoke scope (PGSVD_BENCH_SCOPE=smoke), and
torch runs on PGSVD_BENCH_THREADS (default 1) threads.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

from pgsvd_rt.device import DTYPES  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:  # one thread: on a shared CPU, waking a 2nd pool thread costs ms per op
    torch.set_num_threads(int(os.environ.get("PGSVD_BENCH_THREADS", "1")))
SCOPE = os.environ.get("PGSVD_BENCH_SCOPE", "full" if CUDA else "smoke")
PROVIDERS = ("fused", "two_matmul", "dense")


def _env_list(name: str, default):
    raw = os.environ.get(name)
    return default if not raw else [s.strip() for s in raw.split(",") if s.strip()]


def cases() -> list[tuple]:
    """(label, N, K, kappa, M, dtype name) in the scope's order (shape-major: one setup each)."""
    if SCOPE == "smoke":
        shapes, kappas, ms = benchlib.SMOKE_SHAPES, (0.5,), (1, 16)
        dtypes = ["fp16"] if CUDA else ["fp32"]
    elif SCOPE == "full":
        shapes = benchlib.kernel_shapes(_env_list("PGSVD_BENCH_MODELS", list(benchlib.MODELS)))
        kappas = [float(k) for k in _env_list("PGSVD_BENCH_KAPPAS", benchlib.KAPPAS)]
        ms = [int(m) for m in _env_list("PGSVD_BENCH_M", benchlib.M_FULL)]
        dtypes = _env_list("PGSVD_BENCH_DTYPES", ["fp16", "bf16"])
    else:
        raise ValueError(f"PGSVD_BENCH_SCOPE must be 'smoke' or 'full', got {SCOPE!r}")
    return [(label, N, K, kappa, M, dt) for dt in dtypes for label, N, K in shapes
            for kappa in kappas for M in ms]


_CACHE: dict = {}


def _tensors(N: int, K: int, R: int, M: int, dtype: torch.dtype):
    """x (M, K), u (N, R), v (K, R), W = u v^T (N, K); the last case only is kept."""
    key = (N, K, R, M, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        g = torch.Generator(device=DEVICE).manual_seed(0)
        u = torch.randn(N, R, device=DEVICE, dtype=dtype, generator=g) / R**0.5
        v = torch.randn(K, R, device=DEVICE, dtype=dtype, generator=g) / K**0.5
        x = torch.randn(M, K, device=DEVICE, dtype=dtype, generator=g)
        _CACHE[key] = (x, u, v, u @ v.t())
    return _CACHE[key]


def _fn(provider: str, x, u, v, W):
    from pgsvd_rt import ops

    return {"fused": lambda: ops.lowrank_matmul(x, u, v),
            "two_matmul": lambda: (x @ v) @ u.t(),
            "dense": lambda: F.linear(x, W)}[provider]


def _id(case_provider) -> str:
    (label, N, K, kappa, M, dt), prov = case_provider
    return f"{N}x{K}-k{kappa}-M{M}-{dt}-{prov}"


PARAMS = [(c, p) for c in cases() for p in PROVIDERS]


@pytest.mark.benchmark(timer=benchlib.sync_timer, disable_gc=True)
@pytest.mark.parametrize("case_provider", PARAMS, ids=[_id(cp) for cp in PARAMS])
def test_lowrank_matmul(benchmark, case_provider):
    (label, N, K, kappa, M, dt), provider = case_provider
    dtype = DTYPES[dt]
    R = benchlib.rank_for(kappa, N, K)
    x, u, v, W = _tensors(N, K, R, M, dtype)
    fn = _fn(provider, x, u, v, W)
    fn()  # compile / autotune outside the timing
    t0 = benchlib.sync_timer()
    fn()
    once = max(benchlib.sync_timer() - t0, 1e-7)
    elem = torch.finfo(dtype).bits // 8
    nbytes, flops = benchlib.ideal(provider, M, K, N, R, elem)
    benchmark.group = f"{N}x{K} kappa={kappa} M={M} {dt}"
    benchmark.extra_info.update(
        shape=label, N=N, K=K, R=R, kappa=kappa, M=M, dtype=dt, provider=provider,
        device=DEVICE, bytes=nbytes, flops=flops,
        ideal_speedup=(N * K) / (R * (N + K)),
    )
    iterations = 1 if not CUDA else min(1000, max(1, math.ceil(5e-4 / once)))
    rounds = 15 if CUDA else 3
    y = benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    assert y.shape == (M, N)
