"""Batched native ALS (``pgsvd::als_solve``, csrc/) vs the per-layer loop over the torch reference.

Usage::

    python benchmarks/bench_als.py --out benchmarks/results [--device cpu|cuda] [--smoke]

* ``--device cpu``: every attention and MLP linear of the embedded model SmolLM2-135M (30 blocks ×
  q, k, v, o, gate, up, down), ranks from a uniform 40% and 20% budget
  ``R = int((1 − ρ) N M / (N + M))``, fp64, 10 iterations. The native solver gets one call per
  group of equal shape (as the pipeline calls it); the baseline calls
  ``pgsvd_rt.ops.reference.als_solve`` once per layer (Bt = 1). Also times a clean JIT build of
  csrc/ (``torch.utils.cpp_extension.load`` into an empty temp build dir, in a subprocess).
* ``--device cuda``: LLaMA-2-7B shapes (4096×4096, 11008×4096, 4096×11008), R from a 40% budget,
  32 layers per shape in memory-safe batches, fp64 and fp32.
* ``--smoke``: tiny shapes, one repeat, no build timing (for tests).

W, the Grams (G = X Xᵀ, X with a decaying spectrum) and the initial factors are random: values do
not change the work done (Cholesky succeeds on both paths). Each layer has its own Gram, as q and o
do in the real model. Writes ``<device slug>-<date>-als.json`` and ``.md`` into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import pgsvd_rt.ops as ops
from pgsvd_rt.compress import solvers
from pgsvd_rt.compress.ranks import uniform_rank
from pgsvd_rt.ops import _native, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import MODELS, block_linears, device_name  # noqa: E402
from benchlib import shape_groups as bench_shape_groups  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, N = out_features, M = in_features), per block; from the models' configs (benchlib).
SMOLLM2_135M = {"layers": MODELS["smollm2-135m"]["layers"],
                "linears": block_linears("smollm2-135m")}
LLAMA2_7B = {"layers": MODELS["llama2-7b"]["layers"], "linears": bench_shape_groups("llama2-7b")}
SMOKE = {"layers": 3, "linears": [("q", 48, 48), ("k", 16, 48), ("gate", 96, 48), ("down", 48, 96)]}


def shape_groups(model: dict) -> list[tuple[str, int, int, int]]:
    """Groups of equal (N, M): (names, N, M, number of layers)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, N, M in model["linears"]:
        groups.setdefault((N, M), []).append(name)
    return [("/".join(n), N, M, len(n) * model["layers"]) for (N, M), n in groups.items()]


def make_problem(Bt: int, N: int, M: int, R: int, dtype, device, seed: int = 0):
    """W (Bt,N,M), per-layer Grams G (Bt,M,M), random A0 (Bt,N,R), B0 (Bt,R,M)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    opts = dict(dtype=dtype, device=device)
    W = torch.randn(Bt, N, M, generator=gen, **opts) / M**0.5
    decay = torch.logspace(0, -3, M, **opts)[:, None]
    pool = min(Bt, 2)  # a few distinct Grams, copied into a real (Bt, M, M) tensor
    X = torch.randn(pool, M, M + 64, generator=gen, **opts) * decay
    Gp = X @ X.transpose(1, 2) / M
    del X
    G = Gp[torch.arange(Bt, device=device) % pool].contiguous()
    A0 = torch.randn(Bt, N, R, generator=gen, **opts) / R**0.5
    B0 = torch.randn(Bt, R, M, generator=gen, **opts) / M**0.5
    return W, G, A0, B0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds). On a shared CPU the wall time includes waiting for
    other processes; CPU time (all threads) does not, so both are reported."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _time_pair(fa, fb, device: str, repeats: int) -> tuple[list, list]:
    """Alternates a and b (a, b, b, a, a, b, ...) so drifting background load hits both."""
    ta, tb = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            (ta if which == 0 else tb).append(_time(fa if which == 0 else fb, device))
    return ta, tb


def _batch_size(Bt: int, N: int, M: int, R: int, dtype, device: str) -> int:
    """Largest batch whose inputs plus ALS temporaries fit in half the free device memory."""
    if device != "cuda":
        return Bt
    per = (2 * N * M + M * M + 6 * R * (N + M) + 4 * R * R) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(Bt, int(0.5 * free // per)))


def als_flops(N: int, M: int, R: int, iters: int) -> float:
    """FLOPs of the native program for one layer: per iteration five GEMMs (B Gᵀ, B G Bᵀ,
    (W G Bᵀ)ᵀ, Aᵀ A, Aᵀ W), two R×R Cholesky factorisations and their triangular solves."""
    gemm = R * M * M + R * R * M + R * M * N + R * R * N + R * N * M
    return iters * (2 * gemm + 2 * R * R * (N + M) + 2 * R**3 / 3)


def _rel_obj_diff(W, G, A, B, Ar, Br) -> float:
    def f(A_, B_):
        E = (W - A_ @ B_).double()
        return torch.einsum("bnm,bmk,bnk->b", E, G.double(), E)

    return ((f(A, B) - f(Ar, Br)).abs() / f(Ar, Br).abs()).max().item()


def bench_group(name, N, M, layers, rho, dtype, device, iters, repeats,
                closed_form_layers: int = 0) -> dict:
    R = uniform_rank(N, M, rho)
    Bt = _batch_size(layers, N, M, R, dtype, device)
    W, G, A0, B0 = make_problem(Bt, N, M, R, dtype, device)
    chunks = -(-layers // Bt)  # full batches of Bt cover all layers (same values reused)

    def native():
        out = None
        for _ in range(chunks):
            out = ops.als_solve(W, G, A0, B0, iters, 1e-10)
        return out

    def loop():
        out = None
        for c in range(chunks):
            for i in range(min(Bt, layers - c * Bt)):
                s = slice(i, i + 1)
                out = reference.als_solve(W[s], G[s], A0[s], B0[s], iters, 1e-10)
        return out

    # Untimed first calls on two layers warm up allocators and BLAS/LAPACK, and give the
    # agreement check (objective of native vs reference on the same problems).
    w = slice(0, min(Bt, 2))
    A, B = ops.als_solve(W[w], G[w], A0[w], B0[w], iters, 1e-10)
    Ar, Br = reference.als_solve(W[w], G[w], A0[w], B0[w], iters, 1e-10)
    agree = _rel_obj_diff(W[w], G[w], A, B, Ar, Br)
    del A, B, Ar, Br
    t_native, t_loop = _time_pair(native, loop, device, repeats)
    # Native needs whole batches; scale its time to exactly `layers` layers.
    scale = layers / (chunks * Bt)
    med_n = statistics.median(t[0] for t in t_native) * scale
    med_l = statistics.median(t[0] for t in t_loop)
    cpu_n = statistics.median(t[1] for t in t_native) * scale
    cpu_l = statistics.median(t[1] for t in t_loop)
    extra = {}
    if closed_form_layers:  # SVD-LLM's closed form, per layer; timed on a few, scaled to all
        n_cf = min(closed_form_layers, Bt, layers)

        def closed_form():
            for i in range(n_cf):
                solvers.svdllm_factors(W[i], G[i], R, 1e-6)

        wall, cpu = _time(closed_form, device)
        extra = {"closed_form_s": wall * layers / n_cf, "closed_form_cpu_s": cpu * layers / n_cf,
                 "closed_form_timed_layers": n_cf}
    return extra | {
        "group": name, "N": N, "M": M, "R": R, "layers": layers, "batch": Bt,
        "budget": rho, "dtype": str(dtype).replace("torch.", ""), "iters": iters,
        "native_s": med_n, "loop_s": med_l, "ratio_loop_over_native": med_l / med_n,
        "native_GFLOPs": als_flops(N, M, R, iters) * layers / med_n / 1e9,
        "native_cpu_s": cpu_n, "loop_cpu_s": cpu_l, "cpu_ratio_loop_over_native": cpu_l / cpu_n,
        "native_runs_wall_cpu_s": t_native, "loop_runs_wall_cpu_s": t_loop,
        "max_rel_objective_diff": agree,
    }


def time_jit_build() -> dict:
    """Clean JIT build of csrc/ into an empty temp dir, in a fresh process (so the registration
    cannot clash with this process's pgsvd_rt._C). Times only the ``load`` call."""
    code = (
        "import time, tempfile\n"
        "from pgsvd_rt.ops._native import jit_build\n"
        "d = tempfile.mkdtemp(prefix='pgsvd_jit_')\n"
        "t0 = time.perf_counter(); m = jit_build('pgsvd_rt_C_bench', d)\n"
        "print('BUILD_S', time.perf_counter() - t0); print('INFO', m.build_info())\n"
    )
    env = dict(os.environ, PGSVD_DISABLE_NATIVE="1", PGSVD_DISABLE_TRITON="1")
    with tempfile.TemporaryDirectory(prefix="pgsvd_jit_home_") as home:
        env["TORCH_EXTENSIONS_DIR"] = home
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=1800)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    if proc.returncode != 0 or "BUILD_S" not in lines:
        return {"method": "torch.utils.cpp_extension.load (JIT, clean temp build dir)",
                "seconds": None, "error": proc.stderr[-2000:]}
    return {"method": "torch.utils.cpp_extension.load (JIT, clean temp build dir, ninja)",
            "seconds": float(lines["BUILD_S"]), "build_info": lines.get("INFO"),
            "max_jobs": os.environ.get("MAX_JOBS", f"ninja default ({os.cpu_count()} cpus)")}


def _gflops_txt(r: dict, ceil: dict) -> str:
    g = r.get("native_GFLOPs")
    if g is None:
        return ""
    c = ceil.get(r["dtype"])
    return f"{g:.1f}" + (f" ({100 * g / c:.0f}%)" if c else "")


def render_markdown(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"# ALS solver: batched native vs per-layer torch loop ({m['device_kind'].upper()})",
        "",
        f"- device: {m['device']}",
        f"- date: {m['date']}; torch {m['torch']}; native {m['native_build_info']}",
        f"- model shapes: {m['model']}; {m['iters']} ALS iterations; uniform rank "
        "R = int((1−ρ)NM/(N+M)); median of "
        f"{m['repeats']} run(s); native = one call per group of equal shape, loop = "
        "reference.als_solve per layer",
    ]
    if report.get("build"):
        b = report["build"]
        sec = f"{b['seconds']:.1f} s" if b.get("seconds") is not None else "failed"
        lines.append(f"- extension build time: {sec} ({b['method']})")
    ceil = report.get("ceiling_GFLOPs") or {}
    lines += ["", "Wall = elapsed seconds; CPU = process CPU seconds of all threads (on a shared "
              "machine the wall time also counts waiting for other processes). Native GFLOP/s = "
              "the FLOPs of the ALS program (`als_flops`: five GEMMs, two R×R Cholesky and their "
              "solves per iteration) over native wall time; the ceiling is an n³ matmul measured "
              "in the same run: " + (", ".join(f"{d} {g:.1f} GFLOP/s" for d, g in ceil.items())
                                      or "not measured") + ".", "",
              "| budget | dtype | group | N×M | R | layers | batch | native wall s | loop wall s "
              "| loop/native wall | native CPU s | loop CPU s | loop/native CPU | native GFLOP/s "
              "(% of ceiling) | max rel Δobj |",
              "|---" * 15 + "|"]
    for r in report["results"]:
        lines.append(
            f"| {r['budget']:.0%} | {r['dtype']} | {r['group']} | {r['N']}×{r['M']} | {r['R']} | "
            f"{r['layers']} | {r['batch']} | {r['native_s']:.3f} | {r['loop_s']:.3f} | "
            f"{r['ratio_loop_over_native']:.2f}× | {r['native_cpu_s']:.3f} | "
            f"{r['loop_cpu_s']:.3f} | {r['cpu_ratio_loop_over_native']:.2f}× | "
            f"{_gflops_txt(r, ceil)} | {r['max_rel_objective_diff']:.1e} |")
    for t in report["totals"]:
        lines.append(
            f"| **{t['budget']:.0%}** | **{t['dtype']}** | **all** | | | {t['layers']} | | "
            f"**{t['native_s']:.2f}** | **{t['loop_s']:.2f}** | **{t['ratio']:.2f}×** | "
            f"**{t['native_cpu_s']:.2f}** | **{t['loop_cpu_s']:.2f}** | "
            f"**{t['cpu_ratio']:.2f}×** | | |")
    cf = [r for r in report["results"] if "closed_form_s" in r]
    if cf:
        lines += ["", "SVD-LLM closed form (Cholesky whitening + SVD per layer; timed on a few "
                  "layers per group, scaled to the group):", "",
                  "| budget | dtype | group | layers | closed form wall s | native ALS wall s |"
                  " timed layers |", "|---" * 7 + "|"]
        lines += [f"| {r['budget']:.0%} | {r['dtype']} | {r['group']} | {r['layers']} | "
                  f"{r['closed_form_s']:.3f} | {r['native_s']:.3f} | "
                  f"{r['closed_form_timed_layers']} |" for r in cf]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON and markdown results")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, no build timing")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --smoke)")
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--layers", type=int, default=None, help="override blocks per shape")
    p.add_argument("--no-build", action="store_true", help="skip the extension build timing")
    p.add_argument("--closed-form-layers", type=int, default=0,
                   help="also time SVD-LLM's closed form on this many layers per group "
                   "(scaled to the group)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the run (default: torch's); 1 keeps tiny "
                   "smoke shapes from stalling on a loaded shared CPU")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a, p)
    finally:
        torch.set_num_threads(threads)


def _run(a: argparse.Namespace, p: argparse.ArgumentParser) -> dict:
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a visible CUDA device")

    if a.smoke:
        model, mname = SMOKE, "smoke (tiny)"
    elif a.device == "cuda":
        model, mname = LLAMA2_7B, "LLaMA-2-7B"
    else:
        model, mname = SMOLLM2_135M, "SmolLM2-135M (embedded model)"
    model = dict(model, layers=a.layers or model["layers"])
    budgets = a.budgets or ([0.4] if a.device == "cuda" else [0.4, 0.2])
    dtypes = [torch.float64, torch.float32] if a.device == "cuda" else [torch.float64]
    repeats = a.repeats or (1 if a.smoke else 3)

    results = []
    for rho in budgets:
        for dtype in dtypes:
            for name, N, M, layers in shape_groups(model):
                r = bench_group(name, N, M, layers, rho, dtype, a.device, a.iters, repeats,
                                a.closed_form_layers)
                results.append(r)
                print(f"{rho:.0%} {r['dtype']} {name} {N}x{M} R={r['R']} x{layers}: native "
                      f"{r['native_s']:.3f}s loop {r['loop_s']:.3f}s "
                      f"({r['ratio_loop_over_native']:.2f}x wall, "
                      f"{r['cpu_ratio_loop_over_native']:.2f}x cpu)", file=sys.stderr, flush=True)
    totals = []
    for rho in budgets:
        for dtype in dtypes:
            rs = [r for r in results if r["budget"] == rho and r["dtype"] == str(dtype)[6:]]
            n, lp = sum(r["native_s"] for r in rs), sum(r["loop_s"] for r in rs)
            cn, cl = sum(r["native_cpu_s"] for r in rs), sum(r["loop_cpu_s"] for r in rs)
            totals.append({"budget": rho, "dtype": str(dtype)[6:], "native_s": n, "loop_s": lp,
                           "ratio": lp / n, "native_cpu_s": cn, "loop_cpu_s": cl,
                           "cpu_ratio": cl / cn, "layers": sum(r["layers"] for r in rs)})

    # n^3 matmul for the compute ceiling: big enough to saturate the device, small in smoke mode.
    ceiling_n = 256 if a.smoke else (8192 if a.device == "cuda" else 2048)
    now = dt.datetime.now(dt.timezone.utc)
    report = {
        "meta": {
            "device_kind": a.device, "device": device_name(a.device),
            "date": now.isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "model": mname, "iters": a.iters,
            "repeats": repeats, "smoke": a.smoke, "native_available": ops.native_available(),
            "native_build_info": _native.module.build_info() if _native.module else None,
        },
        "ceiling_GFLOPs": {str(d)[6:]: 1e3 * benchlib.matmul_tflops(a.device, d, ceiling_n)
                           for d in dtypes},
        "build": None if (a.smoke or a.no_build) else time_jit_build(),
        "results": results,
        "totals": totals,
    }
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{benchlib.device_slug(report['meta']['device'])}-"
                               f"{benchlib.today()}-als")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(report))
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
