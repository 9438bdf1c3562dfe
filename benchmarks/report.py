"""Merge one run's raw benchmark files into ``<device>-<date>.json``, a markdown table and plots.

    python benchmarks/report.py RAW_DIR --out benchmarks/results

RAW_DIR holds any of: ``kernels-bench*.json`` (pytest-benchmark JSON of test_kernels_bench.py),
``*-e2e-*.json`` (bench_e2e.py), ``*-als.json`` (bench_als.py), ``*-compress-*.json``
(bench_compress.py) and the microbenchmark JSON of
bench_lowrank_matmul.py (a file with ``"rows"``). Writes ``<slug>-<date>.json`` (every section),
``.md`` (headline + tables) and, when matplotlib is importable, ``<slug>-<date>-latency_vs_M.png``
(per provider), ``-speedup_vs_kappa.png`` (with the 1/kappa limit) and ``-decode_tokens.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def kernel_rows(pb: dict) -> tuple[list[dict], dict]:
    """pytest-benchmark JSON -> flat rows with ms, GB/s, TFLOP/s, ceiling fractions, speedups."""
    info = pb.get("machine_info", {}).get("pgsvd", {})
    ceil = info.get("ceilings") or {}
    rows = []
    for b in pb.get("benchmarks", []):
        e, s = b["extra_info"], b["stats"]
        med = s["median"]
        r = {k: e[k] for k in ("shape", "N", "K", "R", "kappa", "M", "dtype", "provider")}
        r.update(ms_median=med * 1e3, ms_q1=s["q1"] * 1e3, ms_q3=s["q3"] * 1e3,
                 rounds=s["rounds"], iterations=s.get("iterations"),
                 GBps=e["bytes"] / med / 1e9, TFLOPs=e["flops"] / med / 1e12,
                 ideal_speedup=e["ideal_speedup"])
        if ceil.get("bandwidth_GBps"):
            r["frac_bandwidth"] = r["GBps"] / ceil["bandwidth_GBps"]
            r["frac_compute"] = r["TFLOPs"] / ceil["bf16_TFLOPs"]
        rows.append(r)
    dense = {(r["N"], r["K"], r["kappa"], r["M"], r["dtype"]): r["ms_median"]
             for r in rows if r["provider"] == "dense"}
    for r in rows:
        d = dense.get((r["N"], r["K"], r["kappa"], r["M"], r["dtype"]))
        r["speedup_vs_dense"] = d / r["ms_median"] if d else None
    return rows, info


def load_raw(raw: str) -> dict:
    out: dict = {"kernels": [], "kernels_meta": {}, "microbench": None, "e2e": [], "als": [],
                 "compress": []}
    for path in sorted(glob.glob(os.path.join(raw, "*.json"))):
        with open(path) as f:
            d = json.load(f)
        base = os.path.basename(path)
        if "benchmarks" in d and "machine_info" in d:  # one per model group on a GPU run
            rows, meta = kernel_rows(d)
            out["kernels"] += rows
            out["kernels_meta"] = out["kernels_meta"] or meta
        elif "-compress-" in base:
            out["compress"].append(d)
        elif "-e2e-" in base:
            out["e2e"].append(d)
        elif base.endswith("-als.json"):
            out["als"].append(d)
        elif "rows" in d:
            out["microbench"] = d
    return out


def _device(res: dict) -> str:
    for src in (res["kernels_meta"], (res["microbench"] or {}),
                *(e["meta"] for e in res["e2e"]), *(a["meta"] for a in res["als"])):
        if src.get("device"):
            return src["device"]
    return benchlib.device_name()


def headline(res: dict) -> list[str]:
    lines = []
    rows = res["kernels"]
    big = [r for r in rows if r["M"] in (1, 4096) and "llama2-7b" in r["shape"]]
    if big:
        lines += ["### LLaMA-2-7B shapes, M = 1 and 4096 (kernel suite, medians)", "",
                  "| shape N×K | dtype | κ | M | fused ms | two-matmul ms | dense ms | fused "
                  "speedup | 1/κ | fused frac BW |", "|---" * 10 + "|"]
        by = defaultdict(dict)
        for r in big:
            by[(r["N"], r["K"], r["dtype"], r["kappa"], r["M"])][r["provider"]] = r
        for (N, K, dt, kappa, M), p in sorted(by.items()):
            f, t, d = p.get("fused"), p.get("two_matmul"), p.get("dense")
            if not (f and t and d):
                continue
            fbw = f"{f['frac_bandwidth']:.2f}" if "frac_bandwidth" in f else "-"
            lines.append(f"| {N}×{K} | {dt} | {kappa} | {M} | {f['ms_median']:.4f} | "
                         f"{t['ms_median']:.4f} | {d['ms_median']:.4f} | "
                         f"{f['speedup_vs_dense']:.2f}× | {f['ideal_speedup']:.2f} | {fbw} |")
        lines.append("")
    for e in res["e2e"]:
        vs = {v["variant"]: v for v in e["variants"] if "error" not in v}
        for var in ("pgsvd-40", "pgsvd-40-pad16"):
            if "dense" not in vs or var not in vs:
                continue
            sp = ", ".join(f"batch {a['batch']}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}×"
                           for a, b in zip(vs[var]["decode"], vs["dense"]["decode"],
                                           strict=False))
            lines.append(f"- e2e decode speedup {var} over dense ({e['meta']['model']}): {sp}")
    return lines + ([""] if lines else [])


def kernel_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["## Kernel suite (pytest-benchmark; median ms [q1, q3], GB/s, TFLOP/s)", "",
           "| shape | N×K | dtype | κ | R | M | provider | median ms [q1, q3] | GB/s | TFLOP/s "
           "| frac BW | speedup vs dense | 1/κ |", "|---" * 13 + "|"]
    for r in rows:
        fb = f"{r['frac_bandwidth']:.2f}" if "frac_bandwidth" in r else "-"
        sp = f"{r['speedup_vs_dense']:.2f}×" if r["speedup_vs_dense"] else "-"
        out.append(f"| {r['shape']} | {r['N']}×{r['K']} | {r['dtype']} | {r['kappa']} | "
                   f"{r['R']} | {r['M']} | {r['provider']} | {r['ms_median']:.4f} "
                   f"[{r['ms_q1']:.4f}, {r['ms_q3']:.4f}] | {r['GBps']:.3g} | "
                   f"{r['TFLOPs']:.3g} | {fb} | {sp} | {r['ideal_speedup']:.2f} |")
    return out + [""]


def plots(res: dict, stem: str) -> list[str]:
    """PNG plots; [] when matplotlib is missing (they are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    rows = res["kernels"]
    if rows:
        dts = sorted({r["dtype"] for r in rows})
        dt = "bf16" if "bf16" in dts else dts[0]
        shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: -s[0] * s[1])
        kappa = min(r["kappa"] for r in rows)
        fig, axes = plt.subplots(1, min(3, len(shapes)), figsize=(5 * min(3, len(shapes)), 4),
                                 squeeze=False)
        for ax, (N, K) in zip(axes[0], shapes[:3], strict=False):
            for prov in ("fused", "two_matmul", "dense"):
                pts = sorted((r["M"], r["ms_median"]) for r in rows if r["provider"] == prov and
                             (r["N"], r["K"]) == (N, K) and r["dtype"] == dt
                             and r["kappa"] == kappa)
                if pts:
                    ax.loglog(*zip(*pts, strict=True), marker="o", label=prov, base=2)
            ax.set(title=f"{N}×{K} {dt} κ={kappa}", xlabel="M (tokens per step)",
                   ylabel="median ms")
            ax.legend()
        fig.tight_layout()
        fig.savefig(stem + "-latency_vs_M.png", dpi=100)
        plt.close(fig)
        made.append(stem + "-latency_vs_M.png")
        Ms = sorted({r["M"] for r in rows})
        pick = [m for m in (Ms[0], Ms[-1])]
        fig, axes = plt.subplots(1, len(set(pick)), figsize=(5 * len(set(pick)), 4),
                                 squeeze=False)
        N, K = shapes[0]
        for ax, M in zip(axes[0], sorted(set(pick)), strict=False):
            for prov in ("fused", "two_matmul"):
                pts = sorted((r["kappa"], r["speedup_vs_dense"]) for r in rows
                             if r["provider"] == prov and (r["N"], r["K"]) == (N, K)
                             and r["M"] == M and r["dtype"] == dt and r["speedup_vs_dense"])
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=prov)
            lim = sorted({(r["kappa"], r["ideal_speedup"]) for r in rows
                          if (r["N"], r["K"]) == (N, K) and r["provider"] == "fused"})
            ax.plot(*zip(*lim, strict=True), "k--", marker="x", label="1/κ (limit, actual R)")
            ax.set(title=f"{N}×{K} {dt} M={M}", xlabel="keep ratio κ",
                   ylabel="speedup over dense")
            ax.legend()
        fig.tight_layout()
        fig.savefig(stem + "-speedup_vs_kappa.png", dpi=100)
        plt.close(fig)
        made.append(stem + "-speedup_vs_kappa.png")
    bars = [(e["meta"]["model"].split(",")[0][:28], v["variant"], d["batch"], d["tokens_per_s"])
            for e in res["e2e"] for v in e["variants"] for d in v.get("decode", [])]
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(bars)), 4))
        labels = [f"{m}\n{v} b{b}" for m, v, b, _ in bars]
        ax.bar(range(len(bars)), [t for *_, t in bars])
        ax.set_xticks(range(len(bars)), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="decode tokens/s", title="greedy decode throughput")
        fig.tight_layout()
        fig.savefig(stem + "-decode_tokens.png", dpi=100)
        plt.close(fig)
        made.append(stem + "-decode_tokens.png")
    return made


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw", help="directory with the raw JSON files of one run")
    p.add_argument("--out", required=True)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    res = load_raw(a.raw)
    device = _device(res)
    date = (res["kernels_meta"].get("date") or (res["microbench"] or {}).get("date")
            or benchlib.today())
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"{benchlib.device_slug(device)}-{date}")
    md = [f"# pgsvd_rt benchmarks on {device} ({date})", "",
          "Compare only results from the same device. Raw files: "
          f"`{os.path.relpath(a.raw, a.out)}/`.", ""]
    md += headline(res)
    for e in res["e2e"]:
        md += ["## " + e["meta"]["model"], ""]
        import bench_e2e  # the e2e table renderer lives with the script

        md += bench_e2e.to_markdown(e).splitlines()[2:] + [""]
    if res["microbench"]:
        import bench_lowrank_matmul

        md += ["## Microbenchmark (do_bench; graph = under a CUDA graph)", ""]
        md += bench_lowrank_matmul.to_markdown(res["microbench"]).splitlines()[2:] + [""]
    for als in res["als"]:
        import bench_als

        md += ["## Compression time"] + bench_als.render_markdown(als).splitlines()[1:] + [""]
    for comp in res["compress"]:
        import bench_compress

        md += ["## Whole-model compression"] + bench_compress.render(comp).splitlines()[1:] + [""]
    md += kernel_table(res["kernels"])
    made = [] if a.no_plots else plots(res, stem)
    if made:
        md += ["## Plots", ""] + [f"![{os.path.basename(m)}]({os.path.basename(m)})"
                                  for m in made] + [""]
    elif not a.no_plots:
        md += ["(plots skipped: matplotlib is not installed)", ""]
    out = {"device": device, "date": date, **res, "plots": [os.path.basename(m) for m in made]}
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    sys.stdout.write(f"wrote {stem}.json, {stem}.md and {len(made)} plot(s)\n")
    return out


if __name__ == "__main__":
    main()
