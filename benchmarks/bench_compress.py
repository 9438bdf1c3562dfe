"""Compression time of a whole model on one device: calibration, spectra and ε, batched ALS.

Usage::

    python benchmarks/bench_compress.py --model llama2-7b --out DIR [--device cuda]
        [--ratio 0.4] [--samples 32] [--seq-len 512] [--blocks-per-pass 8]
    python benchmarks/bench_compress.py --smoke --out DIR       # tiny model on the CPU (CI)

The model is built from its public config with random fp32 weights (``bench_e2e.build_dense``;
the GPU machine has no weights), and the calibration tokens are random. Both are given to
``pgsvd_rt.compress_`` exactly as ``pgsvd compress --device`` runs: ranks from every weight's
spectrum, then each group of ``--blocks-per-pass`` blocks calibrated and solved on the device.
The work per step does not depend on the values; the ranks do a little, so the achieved ratio is
recorded. Writes ``<device>-<date>-compress-<model>.json`` and ``.md`` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from bench_e2e import build_dense  # noqa: E402

from pgsvd_rt.compress import compress_  # noqa: E402
from pgsvd_rt.config import CalibConfig, CompressConfig  # noqa: E402
from pgsvd_rt.device import resolve_device  # noqa: E402


def run(args) -> dict:
    device = resolve_device(args.device)
    name = "smoke" if args.smoke else args.model
    t0 = time.perf_counter()
    model, _ = build_dense(name, str(device), torch.float32)
    build_s = time.perf_counter() - t0
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (args.samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                        blocks_per_pass=args.blocks_per_pass)
    config = CompressConfig(method="pgsvd", ratio=args.ratio, als_iters=args.als_iters,
                            calib=calib)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report = compress_(model, config, calib_ids=ids, progress=False, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "device": benchlib.device_name(device.type), "date": benchlib.today(),
        "model": name, "weights": "random fp32", "build_s": build_s,
        "calibration_tokens": [args.samples, args.seq_len],
        "blocks_per_pass": args.blocks_per_pass, "als_iters": args.als_iters,
        "target_ratio": args.ratio, "achieved_ratio": report.achieved_ratio,
        "dense_layers": report.dense_layers, "distinct_ranks": report.distinct_ranks,
        "layers": len(report.layers), "timings": report.timings, **benchlib.versions(),
        "command": benchlib.command(__file__),
    }


def render(res: dict) -> str:
    t = res["timings"]
    peak = t.get("peak_gpu_memory_bytes", t.get("peak_rss_bytes", 0)) / 2**30
    return (f"# Compression time, {res['model']}-shaped ({res['weights']} weights)\n\n"
            f"{res['device']}, {res['date']}. PGSVD at ratio {res['target_ratio']} (achieved "
            f"{res['achieved_ratio']:.3f}, {res['dense_layers']} of {res['layers']} layers "
            f"dense, {res['distinct_ranks']} distinct ranks); calibration "
            f"{res['calibration_tokens'][0]} x {res['calibration_tokens'][1]} random tokens, "
            f"{res['blocks_per_pass'] or 'all'} blocks per pass, {res['als_iters']} ALS "
            f"iterations.\n\n"
            "| step | s |\n|---|---|\n"
            f"| spectra and ε (ranks) | {t['ranks_s']:.1f} |\n"
            f"| calibration (Grams) | {t['calibration_s']:.1f} |\n"
            f"| batched ALS and objectives | {t['solve_s']:.1f} |\n"
            f"| **total** | **{t['total_s']:.1f}** |\n\n"
            f"Peak memory {peak:.1f} GiB. Command: `{res['command']}`\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama2-7b", choices=sorted(benchlib.MODELS))
    ap.add_argument("--smoke", action="store_true", help="tiny random model (CI, CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--blocks-per-pass", type=int, default=8)
    ap.add_argument("--als-iters", type=int, default=10)
    args = ap.parse_args(argv)
    if args.smoke:
        args.samples, args.seq_len, args.blocks_per_pass = 4, 32, 1
    res = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{benchlib.device_slug(res['device'])}-{res['date']}-"
                                  f"compress-{res['model']}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(render(res))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
