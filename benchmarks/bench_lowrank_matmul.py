"""Microbenchmark of pgsvd::lowrank_matmul: fused Triton vs two torch matmuls vs dense F.linear.

    python benchmarks/bench_lowrank_matmul.py --out benchmarks/results            # GPU, first suite
    python benchmarks/bench_lowrank_matmul.py --out benchmarks/results --full     # all M
    python benchmarks/bench_lowrank_matmul.py --out /tmp/b --smoke                # CPU, tiny, CI
    python benchmarks/bench_lowrank_matmul.py --out $RAW --policy T.json          # CUDA path table

Shapes: LLaMA-2-7B (N, K) = (4096, 4096) q/k/v/o, (11008, 4096) gate/up, (4096, 11008) down;
keep ratio kappa in {0.8, 0.6, 0.4}, R = int(kappa * N * K / (N + K)); tokens per step M in
{1, 16, 4096} ({1, 4, 16, 64, 256, 1024, 4096} with --full); fp16 and bf16. Providers:
``fused`` (the op, one launch), ``two_matmul`` ((x @ v) @ u.T), ``dense`` (F.linear with
W = u @ v.T), and for q/k/v ``grouped`` (one launch for three projections) vs ``separate``
(three fused launches); where R is not a multiple of 16, ``fused_pad16`` is the fused op on
the factors zero-padded to the next multiple (exact; what ``pgsvd_rt.nn.pad_ranks_`` does; its
row carries the padded R and its bytes; not in fp16, whose extra autotuning would not fit the
GPU call). Timing: triton.testing.do_bench, median with the 0.2/0.8 quantiles (ms); decode
rows (M <= 16) also under a CUDA graph (do_bench_cudagraph), which hides launch gaps. GB/s
use each provider's own ideal bytes (dense moves N*K weights, low-rank K*R + N*R), TFLOP/s its
own FLOPs; both are also given as a fraction of ceilings measured in the same run (a 1 GiB
device copy for bandwidth, an 8192^3 bf16 matmul for compute). Output: ``<device>-<date>.json``
and ``.md`` in --out, rewritten after every shape (``complete`` false until the end). Compare
only results from the same device.

``--policy TABLE`` measures instead which CUDA path should serve each M (pgsvd_rt/ops/
cuda_policy.py): the op forced to the fused kernel vs forced to two cuBLAS GEMMs, on the same
shapes, at M in {1, 2, 4, ..., 256, 1024, 4096}; under a CUDA graph up to M = 256 (serving
engines replay decode batches of up to a few hundred rows from graphs), eagerly above. Each timed
call cycles through copies of the factors (256 MiB or 16 copies, whichever is less: over 200 MB
at these shapes, four times an H100's 50 MB L2), so weights come from memory as in a model's
step. It writes ``<device>-<date>-cuda-policy.json`` and
``.md`` (every time, and this device's table entry) in --out, and TABLE: the committed table with
this device's entry added or replaced, ready to commit (benchmarks/collect_gpu.sh merges it from
the results instead). Both are rewritten after every shape, so a cut-off run leaves a table of
the shapes it measured. On CPU, ``--smoke`` with ``TRITON_INTERPRET=1`` runs the same code on
tiny shapes through the CUDA kernel's Python (its device key is "cpu").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from pgsvd_rt.device import DTYPES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (  # noqa: E402  (shared shape tables, ideal bytes, timers, ceilings)
    KAPPAS,
    M_FIRST,
    M_FULL,
    SMOKE_SHAPES,
    ceilings,
    command,
    device_name,
    device_slug,
    ideal,
    rank_for,
    shape_groups,
    time_cpu,
    time_cuda,
    today,
    versions,
)

LLAMA2_7B = shape_groups("llama2-7b")  # ("q/k/v/o", 4096, 4096), ("gate/up", ...), ("down", ...)
POLICY_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
POLICY_GRAPH_MAX_M = 256
POLICY_COLD_BYTES = 256 << 20  # factor bytes cycled through per timed call (> L2)
POLICY_MAX_COPIES = 16
POLICY_MARGIN = 0.03  # cuBLAS must be 3% faster to replace the fused default (noise otherwise)


def _providers(x, u, v, W, interp_kernel):
    from pgsvd_rt import ops

    prov = {
        "fused": lambda: ops.lowrank_matmul(x, u, v),
        "two_matmul": lambda: (x @ v) @ u.t(),
        "dense": lambda: F.linear(x, W),
    }
    if interp_kernel is not None:  # CPU smoke: the Triton kernel itself, interpreted
        prov["fused_triton_interp"] = lambda: interp_kernel(x, u, v)
    return prov


def run(args) -> dict:
    from pgsvd_rt import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("bench_lowrank_matmul: no CUDA device; use --smoke on CPU")
    interp_kernel = None
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from pgsvd_rt.kernels.lowrank_matmul import lowrank_matmul_triton as interp_kernel
        except ImportError:
            interp_kernel = None
    if args.smoke:
        shapes, kappas, ms_list = SMOKE_SHAPES, (0.5,), (1, 16)
        dtypes = [torch.float32] if device == "cpu" else [torch.float16]
    else:
        shapes, kappas = LLAMA2_7B, args.kappas or KAPPAS
        ms_list = M_FULL if args.full else M_FIRST
        dtypes = [DTYPES[d] for d in args.dtypes]
    timer = (lambda fn, graph=False: time_cuda(fn, graph)) if device == "cuda" else (
        lambda fn, graph=False: time_cpu(fn))
    ceil = ceilings(device)
    rows = []
    # Rewritten after every shape, so a run cut off by a time limit keeps what it measured.
    res = {
        "device": device_name(device), "device_type": device, "date": today(),
        "torch": torch.__version__, "triton": versions()["triton"], "smoke": bool(args.smoke),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "ceilings": ceil, "rows": rows, "complete": False,
    }

    def record(shape, M, N, K, R, kappa, dtype, name, fn, groups=1, graph=False):
        elem = torch.finfo(dtype).bits // 8
        med, lo, hi = timer(fn, graph)
        nbytes, flops = ideal(name, M, K, N, R, elem, groups)
        row = {
            "shape": shape, "M": M, "N": N, "K": K, "R": R, "kappa": kappa,
            "dtype": str(dtype).removeprefix("torch."), "provider": name, "cuda_graph": graph,
            "ms_median": med, "ms_q20": lo, "ms_q80": hi,
            "GBps": nbytes / (med * 1e-3) / 1e9, "TFLOPs": flops / (med * 1e-3) / 1e12,
        }
        if ceil["bandwidth_GBps"]:
            row["frac_bandwidth"] = row["GBps"] / ceil["bandwidth_GBps"]
            row["frac_compute"] = row["TFLOPs"] / ceil["bf16_TFLOPs"]
        rows.append(row)

    for dtype in dtypes:
        for shape, N, K in shapes:
            for kappa in kappas:
                R = rank_for(kappa, N, K)
                g = torch.Generator(device=device).manual_seed(0)
                u = torch.randn(N, R, device=device, dtype=dtype, generator=g) / R**0.5
                v = torch.randn(K, R, device=device, dtype=dtype, generator=g) / K**0.5
                W = u @ v.t()
                pad16 = -R % 16  # PGSVD ranks are arbitrary; pgsvd_rt.nn.pad_ranks_ aligns them
                up, vp = (F.pad(f, (0, pad16)) for f in (u, v))
                for M in ms_list:
                    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
                    for name, fn in _providers(x, u, v, W, interp_kernel).items():
                        record(shape, M, N, K, R, kappa, dtype, name, fn)
                        if device == "cuda" and M <= 16:
                            record(shape, M, N, K, R, kappa, dtype, name, fn, graph=True)
                    if R % 16 and dtype != torch.float16:  # R' = 16k, zeros (exact); fp16: no time
                        fused_pad = lambda: ops.lowrank_matmul(x, up, vp)  # noqa: B023,E731
                        record(shape, M, N, K, R + pad16, kappa, dtype, "fused_pad16", fused_pad)
                        if device == "cuda" and M <= 16:
                            record(shape, M, N, K, R + pad16, kappa, dtype, "fused_pad16",
                                   fused_pad, graph=True)
                    if shape in ("q/k/v/o", "tiny"):  # q/k/v share x: grouped vs separate
                        us, v_cat = [u, u, u], torch.cat([v, v, v], dim=1)
                        grouped = lambda: ops.lowrank_matmul_grouped(x, us, v_cat)  # noqa: B023,E731
                        separate = lambda: [ops.lowrank_matmul(x, u, v) for _ in range(3)]  # noqa: B023,E731
                        for name, fn in (("grouped", grouped), ("separate", separate)):
                            record(shape, M, N, K, R, kappa, dtype, name, fn, groups=3)
                            if device == "cuda" and M <= 16:
                                record(shape, M, N, K, R, kappa, dtype, name, fn, groups=3,
                                       graph=True)
                u = v = W = up = vp = None  # free the factors before the next shape
                write(args.out, res)
    res["complete"] = True
    return res


def _policy_timer(device: str):
    """(median, q20, q80) ms of fn; shorter than time_cuda's (2 x 11 M x 6 shapes in a box)."""
    if device != "cuda":
        return lambda fn, graph: time_cpu(fn)

    def timer(fn, graph):
        import triton.testing as tt

        fn()  # autotunes the fused kernel outside any capture
        torch.cuda.synchronize()
        if graph:
            return tuple(tt.do_bench_cudagraph(fn, rep=5, quantiles=[0.5, 0.2, 0.8]))
        return tuple(tt.do_bench(fn, warmup=5, rep=20, quantiles=[0.5, 0.2, 0.8]))

    return timer


def run_policy(args) -> dict:
    """Times the fused and the cuBLAS path per (shape, M) and writes the path table (module
    docstring); returns the results document."""
    from pgsvd_rt import ops
    from pgsvd_rt.ops import cuda_policy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    op = ops.lowrank_matmul
    if device == "cpu":
        if not args.smoke:
            raise SystemExit("bench_lowrank_matmul --policy: no CUDA device; use --smoke on CPU")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench_lowrank_matmul --policy --smoke on CPU needs "
                             "TRITON_INTERPRET=1 (the fused path is the interpreted kernel)")
        from pgsvd_rt.ops import _triton

        op = _triton._lowrank_matmul_cuda  # what the dispatcher runs for CUDA tensors
    if args.smoke:
        shapes, kappas, ms_list = SMOKE_SHAPES, (0.5,), (1, 4, 32)
        dtypes = [torch.float32] if device == "cpu" else [torch.float16]
    else:
        shapes, kappas, ms_list = LLAMA2_7B, args.kappas or KAPPAS, POLICY_MS
        dtypes = [DTYPES[d] for d in args.dtypes]
    name, capability = cuda_policy.device_keys(torch.device(device))
    timer = _policy_timer(device)
    stem = os.path.join(args.out, f"{device_slug(device_name(device))}-{today()}"
                                  f"{'-smoke' if args.smoke else ''}-cuda-policy")
    try:
        committed = cuda_policy.load(cuda_policy.TABLE_PATH)
    except (OSError, ValueError):
        committed = cuda_policy.empty_table()
    rows: list[dict] = []
    res = {
        "device": name, "capability": capability, "date": today(), "torch": torch.__version__,
        "triton": versions()["triton"], "smoke": bool(args.smoke),
        "graph_max_m": POLICY_GRAPH_MAX_M, "margin": POLICY_MARGIN,
        "command": command(__file__),
        "timings": rows, "table": None, "complete": False,
    }

    def write_all():
        entry = cuda_policy.entry_from_timings(
            rows, capability, margin=POLICY_MARGIN, date=res["date"], torch=res["torch"],
            triton=res["triton"], results=os.path.basename(stem) + ".json",
            shapes=sorted({f"{r['shape']} {r['N']}x{r['K']} R={r['R']}" for r in rows}))
        res["table"] = {"version": cuda_policy.VERSION, "devices": {name: entry}}
        os.makedirs(args.out, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(policy_markdown(res))
        cuda_policy.dump(cuda_policy.merge(committed, res["table"]), args.policy)

    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        # Shape outer, kappa inner: a run cut off early still has both rank classes.
        for shape, N, K in shapes:
            for kappa in kappas:
                R = rank_for(kappa, N, K)
                g = torch.Generator(device=device).manual_seed(0)
                n_copies = 1 if device == "cpu" else max(1, min(
                    POLICY_MAX_COPIES, -(-POLICY_COLD_BYTES // ((N + K) * R * elem))))
                copies = [(torch.randn(N, R, device=device, dtype=dtype, generator=g) / R**0.5,
                           torch.randn(K, R, device=device, dtype=dtype, generator=g) / K**0.5)
                          for _ in range(n_copies)]
                for M in ms_list:
                    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
                    fn = lambda: [op(x, u, v) for u, v in copies]  # noqa: B023,E731
                    graph = device == "cuda" and M <= POLICY_GRAPH_MAX_M
                    for path in cuda_policy.CHOICES:
                        with cuda_policy.override(path), torch.no_grad():  # as served
                            med, lo, hi = (t / n_copies for t in timer(fn, graph))
                        nbytes, _ = ideal("fused", M, K, N, R, elem)
                        rows.append({
                            "shape": shape, "N": N, "K": K, "R": R, "kappa": kappa,
                            "dtype": str(dtype).removeprefix("torch."), "M": M, "path": path,
                            "cuda_graph": graph, "copies": n_copies,
                            "weight": len(shape.split("/")), "ms": med, "ms_q20": lo,
                            "ms_q80": hi, "GBps": nbytes / (med * 1e-3) / 1e9,
                        })
                copies = None  # free before the next shape
                write_all()
    res["complete"] = True
    write_all()
    return res


def policy_markdown(res: dict) -> str:
    """Both paths' times side by side, then the table entry they give."""
    lines = [
        f"# CUDA path policy on {res['device']} ({res['capability']}, {res['date']}, torch "
        f"{res['torch']}, triton {res['triton']})", "",
        f"The op forced to the fused Triton kernel vs to two cuBLAS GEMMs; CUDA graph up to "
        f"M = {res['graph_max_m']}; factors cycled through copies (cold). cuBLAS is chosen "
        f"where its time, summed over a rank class's shapes weighted by layers per block, is "
        f"at least {res['margin']:.0%} below the fused kernel's. Command: `{res['command']}`",
        "", "| shape | dtype | R | M | graph | fused ms [q20, q80] | cublas ms [q20, q80] | "
        "cublas / fused |", "|---|---|---|---|---|---|---|---|",
    ]
    pairs: dict[tuple, dict] = {}
    for r in res["timings"]:
        pairs.setdefault((r["shape"], r["N"], r["K"], r["dtype"], r["R"], r["M"]), {})[
            r["path"]] = r
    for (shape, N, K, dtype, R, M), p in pairs.items():
        if len(p) < 2:
            continue
        f, c = p["fused"], p["cublas"]
        lines.append(
            f"| {shape} {N}x{K} | {dtype} | {R} | {M} | {'y' if f['cuda_graph'] else ''} | "
            f"{f['ms']:.4f} [{f['ms_q20']:.4f}, {f['ms_q80']:.4f}] | "
            f"{c['ms']:.4f} [{c['ms_q20']:.4f}, {c['ms_q80']:.4f}] | {c['ms'] / f['ms']:.2f} |")
    lines += ["", "Table entry (`pgsvd_rt/ops/cuda_policy.json`; lookup in "
              "`pgsvd_rt/ops/cuda_policy.py`):", ""]
    for entry in (res["table"] or {}).get("devices", {}).values():
        for dtype, classes in entry.items():
            if not isinstance(classes, list):
                continue
            for c in classes:
                bound = f"R <= {c['r_max']}" if c["r_max"] is not None else "larger R"
                m = ", ".join(f"{k}: {v} ({c['cublas_over_fused'][k]})"
                              for k, v in c["m"].items())
                lines.append(f"- {dtype}, {bound}: {m}")
    return "\n".join(lines) + "\n"


def to_markdown(res: dict) -> str:
    c = res["ceilings"]
    lines = [
        f"# lowrank_matmul on {res['device']} ({res['date']}, torch {res['torch']}, "
        f"triton {res['triton']})",
        "",
        f"Ceilings measured in this run: copy bandwidth {c['bandwidth_GBps'] or float('nan'):.0f} "
        f"GB/s, bf16 matmul {c['bf16_TFLOPs'] or float('nan'):.0f} TFLOP/s.",
        "",
        "| shape | dtype | kappa | R | M | provider | graph | median ms [q20, q80] | GB/s | "
        "TFLOP/s | frac BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        frac = f"{r['frac_bandwidth']:.2f}" if "frac_bandwidth" in r else "-"
        lines.append(
            f"| {r['shape']} {r['N']}x{r['K']} | {r['dtype']} | {r['kappa']} | {r['R']} | "
            f"{r['M']} | {r['provider']} | {'y' if r['cuda_graph'] else ''} | "
            f"{r['ms_median']:.4f} [{r['ms_q20']:.4f}, {r['ms_q80']:.4f}] | {r['GBps']:.0f} | "
            f"{r['TFLOPs']:.1f} | {frac} |"
        )
    return "\n".join(lines) + "\n"


def write(out: str, res: dict) -> str:
    """(Re)write ``<device>-<date>[-smoke].json/.md`` in ``out``; returns the path stem."""
    os.makedirs(out, exist_ok=True)
    slug = device_slug(res["device"])
    stem = os.path.join(out, f"{slug}-{res['date']}{'-smoke' if res['smoke'] else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(res))
    return stem


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for <device>-<date>.json/.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (CI)")
    p.add_argument("--full", action="store_true", help="M in {1,4,16,64,256,1024,4096}")
    p.add_argument("--kappas", type=float, nargs="+", default=None,
                   help=f"keep ratios (default {' '.join(map(str, KAPPAS))})")
    p.add_argument("--dtypes", nargs="+", choices=["fp16", "bf16"], default=["fp16", "bf16"])
    p.add_argument("--policy", metavar="TABLE", default=None,
                   help="instead: time the fused vs the two-cuBLAS-GEMM path per M bucket and "
                        "write the CUDA path table (committed one + this device) to TABLE")
    args = p.parse_args(argv)
    if args.policy:
        res = run_policy(args)
        entry = next(iter(res["table"]["devices"].values()))
        sys.stdout.write(f"wrote {args.policy} and the timings in {args.out} "
                         f"({len(res['timings'])} rows): {json.dumps(entry)}\n")
        return 0
    res = run(args)
    stem = write(args.out, res)
    sys.stdout.write(f"wrote {stem}.json and {stem}.md ({len(res['rows'])} rows)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
