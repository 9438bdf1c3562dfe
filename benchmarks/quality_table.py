"""Perplexity of every method at given ratios on a model (CPU): JSON + markdown + plot.

    python benchmarks/quality_table.py --out benchmarks/results \
        [--model smollm2-135m] [--ratios 0.2 0.4] [--methods svd asvd svd-llm svd-als pgsvd] \
        [--text-file ../shared/data/wikitext-2-raw/wiki.test.raw] [--samples 64] [--seq-len 512]

Perplexity on the text file (WikiText-2 test: Merity et al. 2016, CC BY-SA 3.0 / GFDL) when it
exists and on the held-out wiki-offline slice; calibration always comes from the wiki-offline
calibration pool. This is ``pgsvd reproduce`` without zero-shot tasks; it writes
``cpu-<date>-quality-<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pgsvd_rt.config import METHODS, CalibConfig
from pgsvd_rt.eval.table import reproduce


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
    result = reproduce(args.out, model=args.model, methods=tuple(args.methods),
                       ratios=tuple(args.ratios), tasks=(), text_file=args.text_file,
                       windows=args.windows, seq_len=args.seq_len, heldout=True, name="quality",
                       calib=CalibConfig(samples=args.samples, seq_len=args.seq_len))
    print(Path(result["files"][1]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
