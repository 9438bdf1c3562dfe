"""CPU kernel table of pgsvd::lowrank_matmul: the native op vs two torch matmuls vs dense F.linear.

    python benchmarks/bench_cpu_kernels.py --out benchmarks/results          # full table
    python benchmarks/bench_cpu_kernels.py --out /tmp/k --smoke              # seconds (CI)
    python benchmarks/bench_cpu_kernels.py --out . --render results/X-kernels.json  # re-render

Shapes (N, K): LLaMA-2-7B (4096, 4096) q/k/v/o, (11008, 4096) gate/up, (4096, 11008) down, and
the embedded SmolLM2-135M's (576, 576), (192, 576), (1536, 576), (576, 1536); keep ratio
kappa in {0.8, 0.6, 0.4}, R = int(kappa N K / (N + K)); tokens M in {1, 16, 256}; fp32 and bf16.

Providers: ``op`` (``torch.ops.pgsvd.lowrank_matmul``: on CPU the C++ kernel of
csrc/lowrank_matmul_cpu.cpp, one pass at decode, two GEMMs at larger M), ``two_matmul``
(``(x @ v) @ u.T`` from Python: two library GEMV/GEMMs), ``dense`` (``F.linear`` with an N x K
weight). Timing, for decode-sized honesty on a CPU whose L3 can hold a whole 7B layer: each
provider cycles through its own copies of its weights, >= 2x the L3 cache (cold weights, as in
a real forward pass where every layer's weights are read once per token), the providers'
calls are interleaved (round-robin, one call each per round) so a shared machine's drifting
load hits all alike, and the median of the rounds is kept (with the 20/80% quantiles). Grad
mode off (``torch.inference_mode``), all torch threads. GB/s count each provider's own minimum
bytes (x, the weights, y); ``frac BW`` divides them by a copy bandwidth (read + write bytes of a
1 GiB ``copy_``) measured at the start and the end of the same run (the mean is used).
Output: ``cpu-<cpu>-<date>-kernels.{json,md}`` in --out, rewritten after every shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402
    KAPPAS,
    device_name,
    device_slug,
    ideal,
    rank_for,
    shape_groups,
    today,
    versions,
)

from pgsvd_rt.device import DTYPES  # noqa: E402

M_CPU = (1, 16, 256)
PROVIDERS = ("op", "two_matmul", "dense")


def l3_bytes() -> int:
    """The last-level cache size from sysfs (fallback 256 MiB: this project's CPUs)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for idx in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * mult)
    return best or (256 << 20)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write bytes (the STREAM copy convention)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(ts) / 1e9


def interleaved(calls: dict, budget_s: float, min_rounds: int = 7,
                max_rounds: int = 60) -> tuple[dict, dict]:
    """(name -> (median, q20, q80) ms, name -> ms of the first call); ``calls[name]`` is a list of
    zero-argument callables that are cycled (one per round), every provider called once per
    round. The first call at a new shape includes whatever the library builds per shape (oneDNN
    JIT-builds a primitive per new bf16 GEMM shape); the timed rounds come after it."""
    first = {}
    for k, fns in calls.items():  # warm-up: first-touch, thread pool, oneDNN primitive caches
        t1 = time.perf_counter()
        fns[0]()
        first[k] = (time.perf_counter() - t1) * 1e3
        fns[-1]()
    t0 = time.perf_counter()
    for fns in calls.values():
        fns[0]()
    per_round = time.perf_counter() - t0
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(per_round, 1e-6))))
    ts = {k: [] for k in calls}
    for i in range(rounds):
        for k, fns in calls.items():
            f = fns[i % len(fns)]
            t1 = time.perf_counter()
            f()
            ts[k].append((time.perf_counter() - t1) * 1e3)
    out = {}
    for k, v in ts.items():
        v.sort()
        out[k] = (statistics.median(v), v[len(v) // 5], v[min(len(v) - 1, 4 * len(v) // 5)])
    return out, first


def _copies(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [t] + [t.clone() for _ in range(n - 1)]


def bench_shape(label: str, N: int, K: int, dtype: torch.dtype, kappas, ms, cold_bytes: int,
                budget_s: float) -> list[dict]:
    from pgsvd_rt import ops

    elem = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator().manual_seed(N * 7 + K)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    Ws = _copies(W, max(2, -(-cold_bytes // (N * K * elem))))
    rows = []
    for kappa in kappas:
        R = rank_for(kappa, N, K)
        u = (torch.randn(N, R, generator=g) / R**0.5).to(dtype)
        v = (torch.randn(K, R, generator=g) / K**0.5).to(dtype)
        n_f = max(2, -(-cold_bytes // ((N + K) * R * elem)))
        # Each provider its own copies: sharing them would hand the second provider of a round
        # the factors the first one just pulled into L3.
        facs = {p: list(zip(_copies(u, n_f), _copies(v, n_f), strict=True))
                for p in ("op", "two_matmul")}
        for M in ms:
            x = torch.randn(M, K, generator=g).to(dtype)
            calls = {
                "op": [lambda x=x, u=u, v=v: ops.lowrank_matmul(x, u, v)
                       for u, v in facs["op"]],
                "two_matmul": [lambda x=x, u=u, v=v: (x @ v) @ u.t()
                               for u, v in facs["two_matmul"]],
                "dense": [lambda x=x, w=w: F.linear(x, w) for w in Ws],
            }
            with torch.inference_mode():
                res, first = interleaved(calls, budget_s)
            dense_ms = res["dense"][0]
            for prov in PROVIDERS:
                med, q1, q3 = res[prov]
                nbytes, flops = ideal("dense" if prov == "dense" else "fused", M, K, N, R, elem)
                rows.append({
                    "shape": label, "N": N, "K": K, "dtype": str(dtype)[6:], "kappa": kappa,
                    "R": R, "M": M, "provider": prov, "ms": med, "ms_q20": q1, "ms_q80": q3,
                    "GBps": nbytes / (med * 1e-3) / 1e9, "GFLOPs": flops / (med * 1e-3) / 1e9,
                    "speedup_vs_dense": dense_ms / med, "ideal_speedup": 1 / kappa,
                    "first_ms": first[prov]})
            print(f"{label} {str(dtype)[6:]} k{kappa} M{M}: " + ", ".join(
                f"{p} {res[p][0]:.3f} ms" for p in PROVIDERS), file=sys.stderr, flush=True)
        del facs
    return rows


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    bw = m["copy_GBps"]
    end = f"{m['copy_GBps_end']:.1f}" if m["copy_GBps_end"] else "pending"
    lines = [
        f"# CPU kernels on {m['device']} ({m['date']})", "",
        f"- torch {m['torch']}, {m['threads']} threads, native kernel AVX-512: "
        f"{m['native'].get('cpu_avx512') if m['native'] else 'not built'}; copy bandwidth "
        f"{bw:.1f} GB/s (read + write; start {m['copy_GBps_start']:.1f}, end {end}); "
        f"cold weights (>= {m['cold_bytes'] / 2**20:.0f} MiB of "
        "copies per provider), providers interleaved, median [q20, q80]",
        "- speedup = dense ms / provider ms; ideal = 1/kappa; frac ideal = speedup x kappa; "
        "frac BW = GB/s / copy bandwidth; first call = the untimed first call at this shape "
        "(what a library builds per shape is in it)", "",
        "| shape | N x K | dtype | kappa | R | M | provider | ms [q20, q80] | GB/s | frac BW | "
        "GFLOP/s | speedup vs dense | frac ideal | first call ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(
            f"| {r['shape']} | {r['N']}x{r['K']} | {r['dtype']} | {r['kappa']} | {r['R']} | "
            f"{r['M']} | {r['provider']} | {r['ms']:.4f} [{r['ms_q20']:.4f}, {r['ms_q80']:.4f}]"
            f" | {r['GBps']:.1f} | {r['GBps'] / bw:.2f} | {r['GFLOPs']:.0f} | "
            f"{r['speedup_vs_dense']:.2f}x | {r['speedup_vs_dense'] * r['kappa']:.2f} | "
            f"{r.get('first_ms', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="one tiny shape, seconds (CI)")
    p.add_argument("--models", nargs="+", default=["llama2-7b", "smollm2-135m"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--m", type=int, nargs="+", default=list(M_CPU))
    p.add_argument("--kappas", type=float, nargs="+", default=list(KAPPAS))
    p.add_argument("--budget-s", type=float, default=1.5, help="timing budget per case")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown of a results file")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            rep = json.load(f)
        with open(a.render.removesuffix(".json") + ".md", "w") as f:
            f.write(to_markdown(rep))
        return rep
    if a.threads:
        torch.set_num_threads(a.threads)
    from pgsvd_rt.ops import _native

    shapes = [(f"{m}:{projs}", N, K) for m in a.models for projs, N, K in shape_groups(m)]
    cold = 2 * l3_bytes()
    if a.smoke:
        shapes, a.kappas, a.m, a.budget_s, cold = [("tiny", 96, 64)], [0.4], [1, 17], 0.05, 1 << 20
    bw0 = copy_bandwidth(reps=2 if a.smoke else 5, nbytes=(1 << 24) if a.smoke else (1 << 30))
    rep = {"meta": {"device": device_name("cpu"), "date": today(), "threads":
                    torch.get_num_threads(), "cold_bytes": cold, "copy_GBps_start": bw0,
                    "copy_GBps_end": None, "copy_GBps": bw0, "smoke": a.smoke,
                    "native": dict(_native.module.build_info()) if _native.load() else None,
                    "complete": False, **versions()}, "rows": []}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{device_slug(rep['meta']['device'])}-{today()}-kernels")

    def write():
        with open(stem + ".json", "w") as f:
            json.dump(rep, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(to_markdown(rep))

    for dname in a.dtypes:
        for label, N, K in shapes:
            rep["rows"] += bench_shape(label, N, K, DTYPES[dname], a.kappas, a.m, cold,
                                       a.budget_s)
            write()
    bw1 = copy_bandwidth(reps=2 if a.smoke else 5, nbytes=(1 << 24) if a.smoke else (1 << 30))
    rep["meta"].update(copy_GBps_end=bw1, copy_GBps=(bw0 + bw1) / 2, complete=True)
    write()
    sys.stdout.write(to_markdown(rep))
    return rep


if __name__ == "__main__":
    main()
