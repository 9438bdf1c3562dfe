"""Accuracy table of every method at given ratios on a model (CPU): JSON + markdown.

    python benchmarks/quality_table.py --out benchmarks/results \
        [--model smollm2-135m] [--ratios 0.2 0.4] [--methods svd asvd svd-llm svd-als pgsvd] \
        [--text-file ../shared/data/wikitext-2-raw/wiki.test.raw] [--samples 64] [--seq-len 512]

Perplexity is measured on the text file (WikiText-2 test: Merity et al. 2016, CC BY-SA 3.0 /
GFDL) when it exists and on the held-out wiki-offline slice; calibration always comes from the
wiki-offline calibration pool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

from pgsvd_rt import data, models
from pgsvd_rt.config import METHODS, CalibConfig
from pgsvd_rt.eval.table import quality_table, render_markdown


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--text-file", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=24)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    t0 = time.perf_counter()
    dense, tok, source = models.load(args.model)
    texts = {}
    if Path(args.text_file).is_file():
        texts["wikitext2"] = data.eval_ids(tok, args.text_file)[0]
    else:
        logging.warning("%s not found: WikiText-2 column skipped", args.text_file)
    texts["wiki-heldout"] = data.eval_ids(tok)[0]
    calib = CalibConfig(samples=args.samples, seq_len=args.seq_len)
    result = quality_table(dense, tok, texts, args.methods, args.ratios, calib,
                           windows=args.windows, seq_len=args.seq_len)
    result |= {"model": source.describe(), "device": f"CPU ({platform.processor() or 'x86_64'})",
               "date": datetime.date.today().isoformat(), "wall_s": time.perf_counter() - t0,
               "command": "python " + " ".join(sys.argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{result['date']}-quality-{args.model.replace('/', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = (f"# Accuracy, {result['model']}\n\n{result['device']}, {result['date']}; calibration "
          f"{args.samples} x {args.seq_len} wiki-offline tokens; perplexity over "
          f"{args.windows} x {args.seq_len}-token windows. Command: `{result['command']}`\n\n"
          + render_markdown(result) + f"\nTotal wall time {result['wall_s']:.0f} s.\n")
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
