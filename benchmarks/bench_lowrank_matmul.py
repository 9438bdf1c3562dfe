"""Microbenchmark of pgsvd::lowrank_matmul: fused Triton vs two torch matmuls vs dense F.linear.

    python benchmarks/bench_lowrank_matmul.py --out benchmarks/results            # GPU, first suite
    python benchmarks/bench_lowrank_matmul.py --out benchmarks/results --full     # all M
    python benchmarks/bench_lowrank_matmul.py --out /tmp/b --smoke                # CPU, tiny, CI

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
    args = p.parse_args(argv)
    res = run(args)
    stem = write(args.out, res)
    sys.stdout.write(f"wrote {stem}.json and {stem}.md ({len(res['rows'])} rows)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
