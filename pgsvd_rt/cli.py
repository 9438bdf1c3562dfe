"""``pgsvd``: the command line. Thin: every command calls the Python API.

Commands: ``compress``, ``eval``, ``info``, ``generate``. With ``--json`` a command prints
exactly one JSON object on stdout (also on error: ``{"error": ...}``); logs and progress bars
go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path

from pgsvd_rt.data import BOS_MODES
from pgsvd_rt.device import DTYPES, resolve_device
from pgsvd_rt.generation import DEFAULT_MODE, MODES

log = logging.getLogger("pgsvd_rt")


def _cmd_compress(args) -> dict:
    from pgsvd_rt import models
    from pgsvd_rt.compress import compress_
    from pgsvd_rt.config import CalibConfig, CompressConfig
    from pgsvd_rt.io import save_factored
    from pgsvd_rt.io.atomic import check_writable

    calib = CalibConfig(samples=args.calib_samples, seq_len=args.seq_len,
                        batch_size=args.batch_size, blocks_per_pass=args.blocks_per_pass)
    ratio = None if args.eps is not None else args.ratio
    config = CompressConfig(method=args.method, ratio=ratio, eps=args.eps,
                            per_class_eps=args.per_class_eps, als_iters=args.als_iters,
                            int8=args.int8, calib=calib)
    if Path(args.out).exists() and not args.overwrite:  # fail before the long work
        raise FileExistsError(f"output directory {args.out!r} exists; pass --overwrite")
    check_writable(args.out)
    device = resolve_device(args.device)  # a bad device is named before the long work
    t0 = time.perf_counter()
    model, tokenizer, source = models.load(args.model)
    if source.kind == "factored":
        raise ValueError(f"{args.model!r} is already a factored checkpoint; compress a dense model")
    report = compress_(model, config, tokenizer=tokenizer, progress=not args.json,
                       device=device)
    out = save_factored(model, args.out, tokenizer=tokenizer,
                        info=report.manifest_info(source, config), overwrite=args.overwrite)
    return report.summary() | {"out": str(out), "base_model": source.describe(),
                               "wall_s": time.perf_counter() - t0}


def _cmd_eval(args) -> dict:
    from pgsvd_rt import data, models
    from pgsvd_rt.eval import perplexity

    model, tokenizer, source = models.load(args.model)
    out = {"model": source.describe()}
    if args.tasks:  # zero-shot; perplexity too only when a text file is named
        from pgsvd_rt.eval.zeroshot import evaluate_tasks

        out["zeroshot"] = evaluate_tasks(model, tokenizer, args.tasks.split(","),
                                         limit=args.limit, batch_size=args.task_batch_size,
                                         progress=not args.json)
        if args.text_file is None:
            return out
    ids, where = data.eval_ids(tokenizer, args.text_file)
    result = perplexity(model, ids, seq_len=args.seq_len, windows=args.windows,
                        batch_size=args.batch_size, progress=not args.json,
                        bos_id=data.bos_id(tokenizer, args.bos))
    return out | {"text": where, "bos_mode": args.bos, **result}


def _cmd_reproduce(args) -> dict:
    from pgsvd_rt.config import CalibConfig
    from pgsvd_rt.eval.table import reproduce

    calib = CalibConfig(samples=args.calib_samples, seq_len=args.seq_len,
                        blocks_per_pass=args.blocks_per_pass)
    result = reproduce(args.out, model=args.model, methods=tuple(args.methods),
                       ratios=tuple(args.ratios),
                       tasks=tuple(t for t in args.tasks.split(",") if t),
                       task_limit=args.limit or None, text_file=args.text_file,
                       windows=args.windows, seq_len=args.seq_len, calib=calib,
                       progress=not args.json, long_windows=args.windows_2048,
                       work_dir=args.work_dir, rows_from=args.rows_from)
    return {"files": result["files"], "wall_s": result["wall_s"],
            "rows": [{k: r.get(k) for k in ("method", "target_ratio", "achieved_ratio", "ppl")}
                     | {"avg_acc": r.get("zeroshot", {}).get("average_acc")}
                     for r in result["rows"]]}


def _cmd_info(args) -> dict:
    from pgsvd_rt.io import read_manifest

    manifest = read_manifest(args.dir)
    layers = manifest.get("layers") or [
        {"name": k, "rank": v["rank"], "out_features": v["out_features"],
         "in_features": v["in_features"]} for k, v in manifest["modules"].items()
    ]
    keys = ("method", "eps", "target_ratio", "achieved_ratio", "dense_layers", "distinct_ranks")
    out = {k: manifest.get(k) for k in keys}
    out["base_model"] = manifest.get("base_model", {}).get("note")
    out["int8_modules"] = sum(m.get("factors") == "int8" for m in manifest["modules"].values())
    out["layers"] = [{k: x[k] for k in ("name", "rank", "out_features", "in_features")}
                     for x in layers]
    return out


def _cmd_upgrade(args) -> dict:
    from pgsvd_rt.io.quant_config import stamp_checkpoint

    entry = stamp_checkpoint(args.dir)
    return {"dir": args.dir, "quant_method": entry["quant_method"],
            "factored_modules": len(entry["ranks"])}


def _print_info(info: dict) -> None:
    print(f"base model     {info['base_model']}")
    for k in ("method", "eps", "target_ratio", "achieved_ratio", "dense_layers",
              "distinct_ranks", "int8_modules"):
        print(f"{k:<14} {info[k]}")
    print(f"\n{'layer':<44} {'N x M':>12} {'rank':>6}")
    for x in info["layers"]:
        rank = "dense" if x["rank"] is None else x["rank"]
        print(f"{x['name']:<44} {x['out_features']:>5} x {x['in_features']:<5} {rank:>6}")


def _cmd_generate(args) -> dict:
    import torch

    from pgsvd_rt import models
    from pgsvd_rt.nn import pad_ranks_

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:i], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: torch sees no CUDA device")
    if args.pad_rank < 0:
        raise ValueError(f"--pad-rank must be >= 0, got {args.pad_rank}")
    model, tokenizer, source = models.load(args.model, dtype=DTYPES[args.dtype])
    if tokenizer is None:
        raise ValueError(f"{args.model!r} has no tokenizer files")
    if args.pad_rank:
        pad_ranks_(model, args.pad_rank)
    text = models.generate_text(model.to(device), tokenizer, args.prompt, args.max_new_tokens,
                                mode=args.decode)
    return {"model": source.describe(), "prompt": args.prompt, "completion": text,
            "device": device, "dtype": args.dtype, "decode": args.decode}


def _cmd_heal(args) -> dict:
    from pgsvd_rt.compress.heal import heal_checkpoint
    from pgsvd_rt.config import HealConfig

    config = HealConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        samples=args.samples, lr=args.lr, bf16=args.bf16,
                        save_every=args.save_every)
    return heal_checkpoint(args.ckpt, args.out, config, teacher=args.teacher,
                           overwrite=args.overwrite, restart=args.restart,
                           progress=not args.json)


def _cmd_serve(args) -> dict:
    from pgsvd_rt.integrations.serve import serve

    status = serve(args.model, host=args.host, port=args.port, dtype=args.dtype,
                   max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                   extra=args.vllm_args, ready_timeout=args.ready_timeout)
    return {"status": status}


def _cmd_bench(args) -> dict:
    from pgsvd_rt.bench import run_suite

    parts = tuple(args.parts) if args.parts else ("kernels", "e2e", "als")
    return run_suite(args.out, smoke=args.smoke, parts=parts, plots=not args.no_plots)


class UsageError(Exception):
    """A command line argparse refused (exit 2, JSON with --json)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


POSITIVE = _int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pgsvd", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    model_help = ("smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, a .gguf file, a HF "
                  "directory, or a pgsvd checkpoint directory")

    c = sub.add_parser("compress", help="compress a model and write a factored checkpoint")
    c.add_argument("--model", default="smollm2-135m", help=model_help)
    c.add_argument("--method", default="pgsvd",
                   choices=["svd", "asvd", "svd-llm", "svd-als", "pgsvd"])
    c.add_argument("--ratio", type=float, default=0.2, help="target compression in (0, 1)")
    c.add_argument("--eps", type=float, default=None, help="PGSVD tolerance (instead of ratio)")
    c.add_argument("--per-class-eps", action="store_true", help="one ε for attention, one for MLP")
    c.add_argument("--calib-samples", type=POSITIVE, default=64)
    c.add_argument("--seq-len", type=_int_at_least(2), default=512)
    c.add_argument("--batch-size", type=POSITIVE, default=4)
    c.add_argument("--blocks-per-pass", type=POSITIVE, default=None,
                   help="bound calibration memory: Grams of this many blocks at a time")
    c.add_argument("--als-iters", type=POSITIVE, default=10)
    c.add_argument("--int8", action="store_true",
                   help="store the factors in int8 (per-row scales, clipping chosen by the "
                        "layer's activation-weighted error); served without dequantising")
    c.add_argument("--device", default="auto",
                   help="where calibration, spectra and ALS run: auto (cuda when present), cpu, "
                        "cuda, cuda:N")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("eval", help="perplexity over fixed non-overlapping windows")
    e.add_argument("--model", default="smollm2-135m", help=model_help)
    e.add_argument("--text-file", default=None,
                   help="e.g. WikiText-2 raw test; default: held-out wiki-offline slice")
    e.add_argument("--windows", type=POSITIVE, default=None, help="default: all complete windows")
    e.add_argument("--seq-len", type=_int_at_least(2), default=512)
    e.add_argument("--batch-size", type=POSITIVE, default=4)
    e.add_argument("--bos", choices=BOS_MODES, default="auto",
                   help="start each window with BOS: auto = the tokenizer's convention "
                        "(default), always, never")
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks (piqa,hellaswag,winogrande,boolq,"
                        "arc_easy,arc_challenge,openbookqa,lambada); perplexity then runs only "
                        "with --text-file")
    e.add_argument("--limit", type=POSITIVE, default=None,
                   help="first N documents of each task (default: all)")
    e.add_argument("--task-batch-size", type=POSITIVE, default=16)

    r = sub.add_parser("reproduce", help="the paper's table: perplexity + zero-shot accuracy "
                                         "for every method x ratio")
    r.add_argument("--model", default="smollm2-135m", help=model_help)
    r.add_argument("--out", default="benchmarks/results")
    r.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd-llm", "svd-als", "pgsvd"],
                   choices=["svd", "asvd", "svd-llm", "svd-als", "pgsvd"])
    r.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    r.add_argument("--tasks", default="arc_easy,piqa,winogrande,lambada,hellaswag",
                   help="comma-separated zero-shot tasks; '' for perplexity only")
    r.add_argument("--limit", type=_int_at_least(0), default=50,
                   help="first N documents of each task; 0: full sets")
    r.add_argument("--text-file", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    r.add_argument("--windows", type=POSITIVE, default=24)
    r.add_argument("--seq-len", type=_int_at_least(2), default=512)
    r.add_argument("--calib-samples", type=POSITIVE, default=64)
    r.add_argument("--blocks-per-pass", type=POSITIVE, default=None,
                   help="hold the Grams of this many decoder blocks in memory at once (one "
                        "calibration, kept on disk and read a group at a time: same statistics, "
                        "less memory)")
    r.add_argument("--windows-2048", type=_int_at_least(0), default=0,
                   help="also score this many 2048-token windows (the published protocol)")
    r.add_argument("--work-dir", default=None,
                   help="keep the calibration and finished rows here; the same command again "
                        "resumes where it stopped")
    r.add_argument("--rows-from", default=None, metavar="RESULT_JSON",
                   help="an earlier run's JSON (same calibration, windows and texts, perhaps "
                        "another machine): its rows count as finished")

    i = sub.add_parser("info", help="ranks and ratio of a factored checkpoint")
    i.add_argument("dir")

    up = sub.add_parser("upgrade", help="add quantization_config to an older checkpoint's "
                        "config.json (for from_pretrained and vLLM), in place")
    up.add_argument("dir")

    g = sub.add_parser("generate", help="greedy generation")
    g.add_argument("--model", default="smollm2-135m", help=model_help)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=POSITIVE, default=32)
    g.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available); "
                   "factored layers run the fused Triton kernel on CUDA, the C++ kernels on CPU")
    g.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    g.add_argument("--pad-rank", type=_int_at_least(0), default=0, metavar="MULTIPLE",
                   help="zero-pad factor ranks to a multiple (16 aligns the kernel's loads; exact)")
    g.add_argument("--decode", default=DEFAULT_MODE, choices=list(MODES),
                   help="static: static KV cache, no autograd (default, fastest for one "
                   "generation); compile: also torch.compile the decode step (faster per token, "
                   "45-55 s to compile on a 2-core CPU); hf: transformers generate")

    b = sub.add_parser("bench", help="run the benchmark suite (GPU or CPU) and write the report")
    b.add_argument("--out", default="benchmarks/results", help="results folder")
    b.add_argument("--smoke", action="store_true", help="tiny shapes and models (seconds)")
    b.add_argument("--parts", nargs="+", choices=["kernels", "e2e", "als"], default=None)
    b.add_argument("--no-plots", action="store_true")

    h = sub.add_parser("heal", help="distil a factored checkpoint toward its dense source on "
                       "calibration text (only the factors and biases train); resumable")
    h.add_argument("ckpt", help="a factored checkpoint directory")
    h.add_argument("--out", required=True, help="the healed checkpoint's directory")
    h.add_argument("--teacher", default=None, help="the dense model (default: the checkpoint's "
                   "base model)")
    h.add_argument("--steps", type=POSITIVE, default=100)
    h.add_argument("--batch-size", type=POSITIVE, default=4)
    h.add_argument("--seq-len", type=_int_at_least(2), default=256)
    h.add_argument("--samples", type=POSITIVE, default=None,
                   help="distinct calibration sequences (default: steps x batch size)")
    h.add_argument("--lr", type=float, default=1e-4)
    h.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: where the CPU has AVX512-BF16)")
    h.add_argument("--save-every", type=POSITIVE, default=10,
                   help="steps between resumable states")
    h.add_argument("--overwrite", action="store_true")
    h.add_argument("--restart", action="store_true", help="discard an interrupted run's state")

    s = sub.add_parser("serve", help="vLLM's OpenAI server for a factored (or dense) model, "
                       "set up for this machine; Ctrl-C stops it")
    s.add_argument("model", help=model_help)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_int_at_least(1), default=8000)
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    s.add_argument("--max-model-len", type=POSITIVE, default=None)
    s.add_argument("--kv-cache-gib", type=float, default=None, help="KV-cache size (GiB)")
    s.add_argument("--ready-timeout", type=float, default=900.0,
                   help="seconds to wait for the server to answer")
    # Arguments after `--` go to vLLM's server as they are (main() splits them off first).
    s.set_defaults(json=False, vllm_args=[])  # a server prints its log, not one JSON object

    for q in (c, e, i, g, b, r, up, h):
        q.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


COMMANDS = {"compress": _cmd_compress, "eval": _cmd_eval, "info": _cmd_info,
            "generate": _cmd_generate, "bench": _cmd_bench, "reproduce": _cmd_reproduce,
            "upgrade": _cmd_upgrade, "serve": _cmd_serve, "heal": _cmd_heal}


def _json_safe(x):
    """x with every non-finite float as null: the output stays valid JSON (RFC 8259)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# Errors of the user's input or environment: one line, no traceback.
_USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, PermissionError,
                OSError, UsageError)


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0, or 2 on any failure (with --json: one JSON object on stdout)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in argv
    command = next((a for a in argv if a in COMMANDS), None)
    passthrough: list[str] = []
    if command == "serve" and "--" in argv:  # `pgsvd serve CKPT [...] -- vLLM's own arguments`
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            args.vllm_args = passthrough
        command, as_json = args.command, args.json
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        result = COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            message = "interrupted"
        elif isinstance(exc, _USER_ERRORS):
            message = str(exc)
        else:  # a defect of ours: say what, keep the traceback on stderr
            message = f"internal error ({type(exc).__name__}): {exc}"
            traceback.print_exc(file=sys.stderr)
        if as_json:
            print(json.dumps({"error": message, "type": type(exc).__name__}))
        print(f"pgsvd {command or ''}: error: {message}".replace("  ", " "), file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 2
    if args.command == "serve":
        return result["status"]
    if args.json:
        print(json.dumps(_json_safe(result), allow_nan=False))
    elif args.command == "info":
        _print_info(result)
    elif args.command == "generate":
        print(args.prompt + result["completion"])
    else:
        for k, v in result.items():
            print(f"{k:<16} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
