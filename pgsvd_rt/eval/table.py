"""The accuracy table: every method × ratio on one model, perplexity on one or more texts.

One calibration pass is shared by every method (Grams of the dense model). For PGSVD the
per-layer ALS objective is compared with SVD-LLM's closed form at the same rank; for SVD-ALS the
SVD-LLM row at the same ratio has the same (uniform) ranks, so its objectives are the reference.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pgsvd_rt import data
from pgsvd_rt.compress import calibrate, compress_
from pgsvd_rt.compress.pipeline import calibration_tokens
from pgsvd_rt.compress.stats_store import calibrate_to_disk, check_same, write_json
from pgsvd_rt.config import CalibConfig, CompressConfig
from pgsvd_rt.device import device_name
from pgsvd_rt.eval.perplexity import perplexity
from pgsvd_rt.eval.zeroshot import evaluate_tasks

log = logging.getLogger("pgsvd_rt")

#: Window length of the long perplexity protocol (the published tables: 2048 tokens).
LONG_SEQ_LEN = 2048


def _objective_ratios(layers, reference: dict[str, float]) -> dict:
    ratios = [x.objective / reference[x.name] for x in layers
              if x.objective is not None and reference.get(x.name)]
    if not ratios:
        return {}
    return {"max": max(ratios), "median": sorted(ratios)[len(ratios) // 2],
            "within_1pct": sum(r <= 1.01 for r in ratios), "layers": len(ratios)}


def quality_table(
    dense: nn.Module,
    tokenizer,
    texts: dict[str, torch.Tensor],
    methods: list[str],
    ratios: list[float],
    calib: CalibConfig,
    windows: int = 24,
    seq_len: int = 512,
    progress: bool = True,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    task_batch_size: int = 16,
    long_windows: int = 0,
    long_seq_len: int = LONG_SEQ_LEN,
    work_dir=None,
    earlier: dict | None = None,
) -> dict:
    """Compress copies of ``dense`` with every method at every ratio and score them.

    Args:
        dense: the dense model (left untouched).
        texts: corpus name -> (T,) token stream for perplexity.
        methods: subset of svd, asvd, svd-llm, svd-als, pgsvd.
        ratios: target compressions.
        tasks: zero-shot tasks scored on every row (None: perplexity only); each row then has
            ``"zeroshot"`` (:func:`pgsvd_rt.eval.zeroshot.evaluate_tasks`'s result).
        task_limit: first N documents of each task (None: all).
        long_windows: also score this many windows of ``long_seq_len`` tokens per text (the
            published tables' protocol: 2048), as ``"<text>@<long_seq_len>"``.
        work_dir: keep the calibration statistics (on disk) and every finished row here; the
            same call again resumes, skipping finished rows (other settings are refused). Zero-
            shot tasks may differ: a finished row without the ones asked gets them (the dense
            row is scored, a compressed row compressed again).
            Without it, ``calib.blocks_per_pass`` puts the statistics in a temporary directory.
        earlier: an earlier run's result (its JSON, perhaps from another machine): its rows
            count as finished, as the work directory's do (those take precedence); its
            calibration, windows and texts must equal this run's. The rows a long table still
            lacks can so be computed one session at a time.

    Returns:
        {"calibration", "rows": [...]} with one dense row and one row per (method, ratio).
    """
    args = (dense, tokenizer, texts, methods, ratios, calib, windows, seq_len, progress, tasks,
            task_limit, task_batch_size, (long_windows, long_seq_len), earlier)
    if work_dir is not None or calib.blocks_per_pass is None:
        return _table(*args, None if work_dir is None else Path(work_dir))
    with tempfile.TemporaryDirectory(prefix="pgsvd-table-") as tmp:
        return _table(*args, Path(tmp))


def _fingerprint(model: nn.Module) -> dict:
    """What identifies the dense model a stored calibration was made from."""
    with torch.no_grad():
        total = sum(float(p.sum(dtype=torch.float64)) for p in model.parameters())
    return {"parameters": sum(p.numel() for p in model.parameters()), "checksum": total}


def _settings_of(result: dict) -> dict:
    """The settings a finished table's rows share (:func:`_table`'s, less the model's
    fingerprint, which older results lack), from its result."""
    long = [result["long_windows"], result["long_seq_len"]]
    suffix = f"@{long[1]}" if long[0] else None
    return {"calibration": {k: v for k, v in result["calibration"].items()
                            if k not in ("wall_s", "blocks_per_pass")},
            "windows": result["windows"], "seq_len": result["seq_len"], "long": long,
            "texts": [t for t in result["rows"][0]["ppl"] if not (suffix and t.endswith(suffix))]}


def _table(dense, tokenizer, texts, methods, ratios, calib, windows, seq_len, progress, tasks,
           task_limit, task_batch_size, long, earlier, work_dir):
    long_windows, long_seq_len = long
    t0 = time.perf_counter()
    model_id = _fingerprint(dense)
    if work_dir is None:  # every Gram in memory, shared by every method
        stats, provenance = calibrate(dense, tokenizer, calib, progress)
        calib_s = time.perf_counter() - t0
    else:  # on disk, read a group of blocks at a time
        ids, provenance = calibration_tokens(tokenizer, calib)
        record = provenance | {"batch_size": calib.batch_size, "model": model_id}
        stats = calibrate_to_disk(dense, ids, record, work_dir / "grams", calib.batch_size,
                                  calib.blocks_per_pass, progress)
        calib_s = stats.wall_s
    # What every row must share; zero-shot tasks are each row's own (a resumed row without the
    # tasks asked gets them: the dense row is scored, a compressed row compressed again).
    settings = {"calibration": provenance, "windows": windows, "seq_len": seq_len,
                "long": [long_windows, long_seq_len], "texts": list(texts), "model": model_id}
    rows_file = None if work_dir is None else work_dir / "rows.json"
    done: dict = {}
    if earlier is not None:
        check_same(_settings_of(earlier), {k: v for k, v in settings.items() if k != "model"},
                   "the earlier result")
        if earlier.get("fingerprint", model_id)["parameters"] != model_id["parameters"]:
            raise ValueError("the earlier result was made from another model "
                             f"({earlier['fingerprint']['parameters']} parameters, this one "
                             f"{model_id['parameters']})")
        done = {(r["method"], r.get("target_ratio")): r for r in earlier["rows"]}
    if rows_file is not None and rows_file.is_file():
        saved = json.loads(rows_file.read_text())
        check_same({k: v for k, v in saved["settings"].items()
                    if k not in ("tasks", "task_limit")},  # files written before rows had them
                   settings, str(rows_file))
        done |= {(r["method"], r.get("target_ratio")): r for r in saved["rows"]}
        log.info("%d finished rows found in %s", len(saved["rows"]), rows_file)

    bos = data.bos_id(tokenizer)
    machine = device_name("cpu")  # each row computed here says where (rows may be merged)

    def score(model):
        ppl = {name: perplexity(model, ids, seq_len, windows, bos_id=bos)["ppl"]
               for name, ids in texts.items()}
        if long_windows:
            ppl |= {f"{name}@{long_seq_len}":
                    perplexity(model, ids, long_seq_len, long_windows, bos_id=bos)["ppl"]
                    for name, ids in texts.items()}
        return ppl

    def zeroshot(model) -> dict:
        if not tasks:
            return {}
        res = evaluate_tasks(model, tokenizer, tasks, limit=task_limit,
                             batch_size=task_batch_size, progress=progress)
        return {"zeroshot": res}

    rows: list[dict] = []

    def finish(row: dict) -> None:
        rows.append(row)
        if rows_file is not None:  # this run's rows, and every saved row it did not select
            mine = {(r["method"], r.get("target_ratio")) for r in rows}
            kept = [r for key, r in done.items() if key not in mine]
            write_json(rows_file, {"settings": settings, "rows": rows + kept})

    def has_tasks(row: dict) -> bool:
        zs = row.get("zeroshot")
        return not tasks or (zs is not None and list(zs["tasks"]) == list(tasks)
                             and zs["limit"] == task_limit)

    # A selected row finished without the tasks asked is compressed again (its model is gone);
    # the saved row stays in the work directory until the new one replaces it.
    selected = [(m, r) for r in ratios for m in methods]
    reuse = {key for key in [("dense", None), *selected] if key in done}
    reuse -= {key for key in selected if key in reuse and not has_tasks(done[key])}
    dense_row = done.get(("dense", None)) or {"method": "dense", "device": machine,
                                               "ppl": score(dense)}
    finish(dense_row if has_tasks(dense_row) else dense_row | zeroshot(dense))
    for ratio in ratios:
        for method in methods:
            if (method, ratio) in reuse:
                finish(done[method, ratio])
                log.info("%s @ %.0f%%: finished before, %s", method, 100 * ratio,
                         done[method, ratio]["ppl"])
                continue
            model = copy.deepcopy(dense)
            config = CompressConfig(method=method, ratio=ratio, calib=calib)
            t = time.perf_counter()
            report = compress_(model, config, tokenizer=tokenizer, stats=stats,
                               calibration=provenance, compare_closed_form=(method == "pgsvd"),
                               progress=progress)
            compress_s = time.perf_counter() - t + calib_s * config.needs_grams
            row = report.summary() | {"device": machine,
                                      "compress_s_incl_calibration": compress_s,
                                      "peak_rss_bytes": report.timings.get("peak_rss_bytes"),
                                      "ppl": score(model)} | zeroshot(model)
            del row["calibration"]
            if method == "svd-llm":
                row["objectives"] = {x.name: x.objective for x in report.layers}
            elif method == "svd-als":
                closed_form = next((r["objectives"] for r in rows if r["method"] == "svd-llm"
                                    and r["target_ratio"] == ratio), {})
                row["als_vs_closed_form"] = _objective_ratios(report.layers, closed_form)
            elif method == "pgsvd":
                row["als_vs_closed_form"] = _objective_ratios(
                    report.layers, {x.name: x.closed_form_objective for x in report.layers})
            finish(row)
            log.info("%s @ %.0f%%: %s", method, 100 * ratio, row["ppl"])
            del model
    return {"calibration": provenance | {"wall_s": calib_s,
                                         "blocks_per_pass": calib.blocks_per_pass},
            "windows": windows, "seq_len": seq_len, "long_windows": long_windows,
            "long_seq_len": long_seq_len, "fingerprint": model_id,
            "bos": bos is not None, "rows": rows,
            "resumed_rows": len(reuse),
            "tasks": list(tasks or []), "task_limit": task_limit}


def render_markdown(result: dict) -> str:
    """A markdown table of :func:`quality_table`'s result."""
    corpora = list(result["rows"][0]["ppl"])
    scored = next((r["zeroshot"] for r in result["rows"] if r.get("zeroshot")), {})
    tasks = list(scored.get("tasks", {}))  # a row without them (resumed, not asked) is blank
    head = "| method | target | achieved | " + " | ".join(f"ppl {c}" for c in corpora)
    if tasks:
        head += " | " + " | ".join(f"{t} acc" for t in tasks) + " | avg acc"
    head += (" | ε | distinct ranks | dense layers | ALS/closed-form (max) |"
             " compress s (incl. calibration) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        ppl = " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora)
        zs = r.get("zeroshot")
        if tasks and zs and list(zs["tasks"]) == tasks:
            ppl += " | " + " | ".join(f"{100 * zs['tasks'][t]['acc']:.1f}" for t in tasks)
            ppl += f" | {100 * zs['average_acc']:.1f}"
        elif tasks:
            ppl += " |" * (len(tasks) + 1)
        if r["method"] == "dense":
            lines.append(f"| dense | - | - | {ppl} | | | | | |")
            continue
        eps = "" if r.get("eps") is None else (
            f"{r['eps']:.4f}" if isinstance(r["eps"], float) else str(r["eps"]))
        als = r.get("als_vs_closed_form") or {}
        als_txt = (f"{als['max']:.4f} ({als['within_1pct']}/{als['layers']} ≤1.01)"
                   if als else "")
        lines.append(
            f"| {r['method']} | {r['target_ratio']:.2f} | {r['achieved_ratio']:.4f} | {ppl} | "
            f"{eps} | {r['distinct_ranks']} | {r['dense_layers']} | {als_txt} | "
            f"{r['compress_s_incl_calibration']:.0f} |")
    return "\n".join(lines) + "\n"


#: ``make reproduce`` defaults: the paper's Table 1 shape on the embedded model, sized for a
#: 2-core CPU (under an hour): 26 rows × (perplexity + 5 tasks × REPRO_TASK_LIMIT items).
REPRO_METHODS = ("svd", "asvd", "svd-llm", "svd-als", "pgsvd")
REPRO_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
REPRO_TASK_LIMIT = 50


def plot_perplexity(result: dict, path, corpus: str) -> bool:
    """Perplexity vs compression, one line per method (log scale). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: plot %s skipped", path)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r for r in result["rows"] if r["method"] == "dense")["ppl"][corpus]
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != "dense"):
        pts = sorted((r["target_ratio"], r["ppl"][corpus]) for r in result["rows"]
                     if r["method"] == method)
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("compression of the linear layers (%)")
    ax.set_ylabel(f"perplexity ({corpus})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def reproduce(
    out_dir,
    model: str = "smollm2-135m",
    methods: tuple[str, ...] = REPRO_METHODS,
    ratios: tuple[float, ...] = REPRO_RATIOS,
    tasks: tuple[str, ...] | None = None,
    task_limit: int | None = REPRO_TASK_LIMIT,
    text_file: str | None = "../shared/data/wikitext-2-raw/wiki.test.raw",
    windows: int = 24,
    seq_len: int = 512,
    calib: CalibConfig | None = None,
    progress: bool = True,
    heldout: bool = False,
    name: str = "reproduce",
    long_windows: int = 0,
    work_dir=None,
    rows_from=None,
) -> dict:
    """The paper's Table 1 shape: perplexity + average zero-shot accuracy for every method × ratio.

    Writes ``<out_dir>/cpu-<date>-<name>-<model>.json``, ``.md`` and (with matplotlib)
    ``-ppl.png``; returns the result. Perplexity: WikiText-2 when ``text_file`` exists, else the
    held-out wiki slice; ``heldout`` adds the held-out slice as a second column. ``tasks=()``
    scores no zero-shot task (None: :data:`pgsvd_rt.eval.zeroshot.DEFAULT_TASKS`).
    ``long_windows`` and ``work_dir`` (resume a long run): see :func:`quality_table`;
    ``rows_from``: an earlier run's JSON whose rows count as finished (``earlier`` there).
    """
    import datetime
    import resource

    from pgsvd_rt import models
    from pgsvd_rt.eval.zeroshot import DEFAULT_TASKS

    t0 = time.perf_counter()
    tasks = DEFAULT_TASKS if tasks is None else tuple(tasks)
    calib = calib or CalibConfig()
    dense, tok, source = models.load(model)
    earlier = None if rows_from is None else json.loads(Path(rows_from).read_text())
    if earlier is not None and earlier["model"] != source.describe():
        raise ValueError(f"{rows_from} scored {earlier['model']!r}, not {source.describe()!r}")
    texts = {}
    if text_file and Path(text_file).is_file():
        texts["wikitext2"] = data.eval_ids(tok, text_file)[0]
    else:
        log.warning("%s not found: perplexity on the held-out wiki-offline slice", text_file)
    if heldout or not texts:
        texts["wiki-heldout"] = data.eval_ids(tok)[0]
    corpus = next(iter(texts))
    result = quality_table(dense, tok, texts, list(methods), list(ratios), calib,
                           windows=windows, seq_len=seq_len, progress=progress,
                           tasks=list(tasks), task_limit=task_limit,
                           long_windows=long_windows, work_dir=work_dir, earlier=earlier)
    date = datetime.date.today().isoformat()
    prog = Path(sys.argv[0]).name
    command = shlex.join(["pgsvd" if prog in ("cli.py", "pgsvd") else prog, *sys.argv[1:]])
    result |= {"model": source.describe(), "device": device_name("cpu"),
               "date": date, "wall_s": time.perf_counter() - t0, "command": command,
               # this run's peak, or a resumed row's where that was higher
               "peak_rss_bytes": max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
                                     + [r.get("peak_rss_bytes") or 0 for r in result["rows"]])}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-{date}-{name}-{model.replace('/', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plotted = plot_perplexity(result, out / f"{stem}-ppl.png", corpus)
    if earlier is not None:
        result["rows_from"] = {"file": str(rows_from), "device": earlier["device"],
                               "date": earlier["date"], "command": earlier["command"]}
    resumed = (" (this run; finished rows were reused from an earlier one, each row keeps "
               "its own compress time)" if result.get("resumed_rows") else "")
    elsewhere: dict[str, list[str]] = {}  # a row without its device: the earlier file's, or here
    for r in result["rows"]:
        where = r.get("device") or (earlier or {}).get("device") or result["device"]
        if where != result["device"]:
            elsewhere.setdefault(where, []).append(
                r["method"] + ("" if r["method"] == "dense" else f" {r['target_ratio']:.2f}"))
    if elsewhere:
        resumed += "; rows computed on another machine" + "".join(
            f" ({where}: {', '.join(rows)})" for where, rows in elsewhere.items())
        if earlier is not None:
            resumed += f", reused from `{Path(rows_from).name}`"

    # Zero-shot as the rows have it (a resumed row may have been scored by an earlier run).
    scored = [r["zeroshot"] for r in result["rows"] if r.get("zeroshot")]
    zs_txt = ""
    if scored:
        limit = scored[0]["limit"]
        zs_txt = (f"; zero-shot acc (%) on {'all' if limit is None else f'the first {limit}'} "
                  f"documents of {', '.join(scored[0]['tasks'])} (lm-eval prompts and scoring, "
                  "`pgsvd_rt.eval.zeroshot`)"
                  + ("" if len(scored) == len(result["rows"]) else "; blank: not scored"))
    md = (f"# Accuracy table, {result['model']}\n\n{result['device']}, {date}. Calibration "
          f"{calib.samples} x {calib.seq_len} wiki-offline tokens; perplexity "
          f"({', '.join(texts)}) over {windows} x {seq_len}-token windows"
          + (f" and {long_windows} x {LONG_SEQ_LEN} (columns @{LONG_SEQ_LEN})"
             if long_windows else "")
          + f"{' (each starting with BOS)' if result['bos'] else ''}{zs_txt}.\n\n"
          + render_markdown(result)
          + (f"\n![perplexity vs compression]({stem}-ppl.png)\n" if plotted else "")
          + f"\nTotal wall time {result['wall_s']:.0f} s{resumed}, peak RSS "
            f"{result['peak_rss_bytes'] / 2**30:.1f} GiB. Command: `{command}`\n")
    (out / f"{stem}.md").write_text(md)
    result["files"] = [str(out / f"{stem}.{ext}") for ext in ("json", "md")]
    return result
