"""``make demo``: PGSVD at 20% on the embedded model, end to end, on a CPU.

1. load SmolLM2-135M-Instruct (the dequantised 4-bit GGUF checkpoint, fp32);
2. one calibration pass (Grams) on the wiki-offline corpus, shared by both methods;
3. compress a copy with SVD-LLM and one with PGSVD at 20%;
4. perplexity of dense / SVD-LLM / PGSVD (WikiText-2 test when the file is found, else the
   held-out wiki-offline slice);
5. save the PGSVD checkpoint, reload it, check the logits are identical, greedy-generate.

Environment: ``PGSVD_TEXT_FILE`` (evaluation text), ``PGSVD_DEMO_OUT`` (checkpoint directory,
default ``out/demo-pgsvd-20``), ``PGSVD_DEMO_SAMPLES`` (calibration sequences, default 32).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from pathlib import Path

import torch

from pgsvd_rt import data, models
from pgsvd_rt.compress import calibrate, compress_
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.eval import perplexity
from pgsvd_rt.io import load_factored, save_factored

log = logging.getLogger("pgsvd_rt")
WIKITEXT_CANDIDATES = ("../shared/data/wikitext-2-raw/wiki.test.raw",)
EVAL_WINDOWS, EVAL_SEQ_LEN = 24, 512
PROMPT = "The capital of France is"


def _eval_text() -> str | None:
    explicit = os.environ.get("PGSVD_TEXT_FILE")
    if explicit:
        return explicit
    return next((p for p in WIKITEXT_CANDIDATES if Path(p).is_file()), None)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    dense, tok, source = models.load("smollm2-135m")
    log.info("base model: %s", source.describe())
    text_file = _eval_text()
    ids, where = data.eval_ids(tok, text_file)
    log.info("evaluation text: %s (%d windows x %d tokens)", where, EVAL_WINDOWS, EVAL_SEQ_LEN)

    calib = CalibConfig(samples=int(os.environ.get("PGSVD_DEMO_SAMPLES", 32)), seq_len=512)
    stats, provenance = calibrate(dense, tok, calib)
    bos = data.bos_id(tok)
    rows = [("dense (dequantised 4-bit)", None, perplexity(dense, ids, EVAL_SEQ_LEN, EVAL_WINDOWS,
                                                           bos_id=bos)["ppl"], None)]
    reports, models_by_method = {}, {}
    for method in ("svd-llm", "pgsvd"):
        config = CompressConfig(method=method, ratio=0.2, calib=calib)
        model = copy.deepcopy(dense)
        report = compress_(model, config, stats=stats, calibration=provenance)
        ppl = perplexity(model, ids, EVAL_SEQ_LEN, EVAL_WINDOWS, bos_id=bos)["ppl"]
        rows.append((method, report.achieved_ratio, ppl, report))
        reports[method], models_by_method[method] = (report, config), model

    report, config = reports["pgsvd"]
    out = Path(os.environ.get("PGSVD_DEMO_OUT", "out/demo-pgsvd-20"))
    save_factored(models_by_method["pgsvd"], out, tokenizer=tok,
                  info=report.manifest_info(source, config), overwrite=True)
    reloaded, tok2, _ = load_factored(out)
    probe = ids[:64][None]
    with torch.no_grad():
        same = torch.equal(models_by_method["pgsvd"](probe).logits, reloaded(probe).logits)
    completion = models.generate_text(reloaded, tok2, PROMPT, max_new_tokens=16)

    print(f"\nSmolLM2-135M-Instruct ({source.describe()}), perplexity on {where}, "
          f"{EVAL_WINDOWS} x {EVAL_SEQ_LEN} tokens; calibration {calib.samples} x "
          f"{calib.seq_len} tokens of wiki-offline (CPU)")
    print(f"| {'method':<26} | {'achieved ratio':>14} | {'perplexity':>10} | notes")
    print(f"|{'-' * 28}|{'-' * 16}|{'-' * 12}|------")
    for name, ratio, ppl, rep in rows:
        r = "-" if ratio is None else f"{ratio:.4f}"
        note = ""
        if rep is not None and rep.method == "pgsvd":
            note = (f"eps={rep.eps:.4f}, {rep.distinct_ranks} distinct ranks, "
                    f"{rep.dense_layers} dense layers")
        print(f"| {name:<26} | {r:>14} | {ppl:>10.2f} | {note}")
    print(f"\ncheckpoint: {out} (reloaded logits identical: {same})")
    print(f"greedy from the reloaded model: {PROMPT!r} -> {completion!r}")
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
