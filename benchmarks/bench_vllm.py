"""vLLM dense vs vLLM serving factored checkpoints: decode tokens/s and concurrent throughput.

    python benchmarks/bench_vllm.py --model smollm2-135m \\
        --ckpt pgsvd-20=ckpts/smollm2-pgsvd-20 --ckpt pgsvd-40=ckpts/smollm2-pgsvd-40 \\
        --out benchmarks/results

Variants: ``dense`` (``--model`` loaded by pgsvd_rt and written as a plain HF directory) and every
``--ckpt NAME=DIR`` (a factored checkpoint, served through the pgsvd quantization method, no
extra flag). Per dtype every variant's engine is started once and kept alive in its own
subprocess (this script with ``--worker``, warmed up at every concurrency); then the variants take
turns, one generation each, concurrency by concurrency, round by round (``--rounds``, the order
rotated each round), so a shared machine's drifting load hits all alike; the median over rounds
is reported. An idle engine waits on its stdin and uses no CPU.

Measured per variant and ``--concurrency`` c: c requests of ``--prompt`` random tokens, each
generating ``--new-tokens`` greedy tokens (ignore_eos), submitted together; output tokens/s =
c T / wall. At c = 1 this is one request's decode rate (its prefill included). Beside each ratio
against dense, the ideal one from bytes read per decoded token: every tensor of the checkpoint
but the input embedding, plus the head (the tied embedding when tied), at the served dtype.
Engines run eager (``--compile`` for vLLM's torch.compile; it costs minutes per start on a
small CPU). ``--tp T`` serves every variant with tensor parallelism T (on the CPU: T ranks of
cores/T threads, one process each); ``--tp-reduce rank`` serves the factored checkpoints with
``PGSVD_VLLM_TP_REDUCE=rank`` (row-parallel layers all-reduce the (M, R) partial instead of the
(M, N) output), ``both`` adds them as ``NAME@rank`` beside the default reduction.
The same script runs on a GPU where vLLM is installed.
Output: ``<device>-<date>-vllm-<model>[-tp<T>].{json,md}`` in --out. Beside the ratio of the
median tok/s, the paired ratio (median over rounds of the ratio within a round, with its range):
on a noisy machine it is the steadier of the two, and the fraction of the ideal is taken from it.
``--render JSON`` rewrites the markdown of a saved report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

log = logging.getLogger("bench_vllm")
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def bytes_per_token(directory: str, dtype: str) -> int:
    """Bytes of weights one decode step reads (see the module doc), from the tensor header."""
    from pgsvd_rt.io.quant_config import read_header

    header = read_header(directory)
    tied = json.load(open(os.path.join(directory, "config.json"))).get("tie_word_embeddings")
    numel = {k: 1 for k in header}
    for k, (shape, _) in header.items():
        for s in shape:
            numel[k] *= s
    emb = next(k for k in header if k.endswith("embed_tokens.weight"))
    total = sum(numel.values()) - (0 if tied else numel[emb])
    return total * ELEM[dtype]


def dense_dir(spec: str, root: str) -> str:
    """The dense model as a plain HF directory vLLM can load (architectures set)."""
    from pgsvd_rt import models

    model, tok, _ = models.load(spec)
    model.config.architectures = [type(model).__name__]
    out = os.path.join(root, "dense")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def worker(a) -> None:
    """One engine kept alive: reads ``RUN c`` lines on stdin, answers ``BENCH {json}``."""
    cpus = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cpus // a.tp)))
    if a.tp == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:  # one process per rank, each bound to its own cores
        per = max(1, cpus // a.tp)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            f"{i * per}-{i * per + per - 1}" if per > 1 else str(i % cpus) for i in range(a.tp)))
    import random

    from vllm import LLM, SamplingParams

    llm = LLM(model=a.worker, dtype=a.dtype, max_model_len=a.prompt + a.new_tokens + 8,
              tensor_parallel_size=a.tp, enforce_eager=not a.compile,
              kv_cache_memory_bytes=int(a.kv_cache_gib * 2**30), seed=0)
    sp = SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)
    rng = random.Random(0)

    def prompts(c):
        return [{"prompt_token_ids": [rng.randrange(100, 20000) for _ in range(a.prompt)]}
                for _ in range(c)]

    for c in a.concurrency:  # warm-up: every batch shape once
        llm.generate(prompts(c), sp, use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.startswith("RUN "):
            break
        c = int(line.split()[1])
        t0 = time.perf_counter()
        res = llm.generate(prompts(c), sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        tok = sum(len(r.outputs[0].token_ids) for r in res)
        print("BENCH " + json.dumps({"c": c, "tok_s": tok / wall}), flush=True)


class Engine:
    """A worker subprocess holding one engine (``worker``); ``run(c)`` times one generation."""

    def __init__(self, a, directory: str, dtype: str, tp_reduce: str = "output") -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", directory, "--dtype", dtype,
               "--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens), "--kv-cache-gib",
               str(a.kv_cache_gib), "--concurrency", *map(str, a.concurrency), "--out", a.out,
               "--tp", str(getattr(a, "tp", 1))]
        if a.compile:
            cmd.append("--compile")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PGSVD_VLLM_TP_REDUCE"] = tp_reduce
        self.what = f"{directory} {dtype}"
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env)
        self._read("READY")

    def _read(self, tag: str) -> str:
        for line in self.p.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        self.err.seek(0)
        raise RuntimeError(f"vLLM worker failed on {self.what}:\n{self.err.read()[-3000:]}")

    def run(self, c: int) -> float:
        self.p.stdin.write(f"RUN {c}\n")
        self.p.stdin.flush()
        return json.loads(self._read("BENCH "))["tok_s"]

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.err.close()


def paired(r: dict, dense: dict, c) -> tuple[float, float, float]:
    """Median, min and max over rounds of r's tok/s over dense's in the same round: the variants
    of a round run back to back, so this pairs them under the same load (a shared machine's
    drift moves both); the ratio of the medians mixes rounds."""
    ratios = [a / b for a, b in zip(r["rounds"][str(c)], dense["rounds"][str(c)])]
    return statistics.median(ratios), min(ratios), max(ratios)


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"# vLLM serving on {m['device']} ({m['date']}): {m['model']}", ""]
    if m.get("note"):  # what the numbers alone do not say (the commit measured, the machine)
        lines += [m["note"], ""]
    lines += [f"vLLM {m['vllm']}, {'compiled' if m['compile'] else 'eager'}, "
              f"tensor parallel {m.get('tp', 1)}, prompt {m['prompt']} "
              f"tokens, {m['new_tokens']} new tokens per request, median of {m['rounds']} rounds "
              "(engines kept alive, variants taking turns). Command: `python benchmarks/"
              "bench_vllm.py` (see its header). tok/s = output tokens/s over all requests; "
              "ratio = median tok/s over dense's; paired = median over rounds of the ratio to "
              "dense in the same round (range in brackets); frac ideal = paired / ideal.", ""]
    for dtype, rows in rep["results"].items():
        cs = m["concurrency"]
        lines += [f"## {dtype}", "",
                  "| variant | MB/token | ideal | " + " | ".join(
                      f"c={c} tok/s | ratio | paired | frac ideal" for c in cs) + " |",
                  "|---|---|---|" + "---|---|---|---|" * len(cs)]
        dense = rows[0]
        for r in rows:
            ideal = dense["bytes_per_token"] / r["bytes_per_token"]
            cells = []
            for c in cs:
                tps = r["tok_s"][str(c)]
                ratio = tps / dense["tok_s"][str(c)]
                med, lo, hi = paired(r, dense, c)
                cells.append(f"{tps:.1f} | {ratio:.2f}x | {med:.2f}x ({lo:.2f}-{hi:.2f}) | "
                             f"{med / ideal:.2f}")
            lines.append(f"| {r['name']} | {r['bytes_per_token'] / 1e6:.1f} | {ideal:.2f}x | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render(path: str) -> str:
    """Rewrite the markdown beside a saved JSON report (same stem) and return it."""
    with open(path) as f:
        md = to_markdown(json.load(f))
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(md)
    return md


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="directory for the JSON + markdown report")
    p.add_argument("--render", metavar="JSON", help="rewrite a saved report's markdown and exit")
    p.add_argument("--model", default="smollm2-135m", help="the dense model (a pgsvd spec)")
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(ELEM))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="vLLM KV-cache size per engine (kv_cache_memory_bytes)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--tp-reduce", choices=["output", "rank", "both"], default="output",
                   help="the factored checkpoints' row-parallel reduction (see the header)")
    p.add_argument("--note", default="", help="a line for the report: what the numbers alone "
                   "do not say (the commit, the machine)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.render:
        sys.stdout.write(render(a.render))
        return None
    if not a.out:
        p.error("--out is required (unless --render)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    ckpts = {}
    for item in a.ckpt:
        name, sep, path = item.partition("=")
        if not sep or not name or name == "dense" or not os.path.isdir(path):
            p.error(f"--ckpt must be NAME=DIR with an existing directory, got {item!r}")
        ckpts[name] = path
    import vllm

    device = benchlib.device_name("cuda" if _cuda() else "cpu")
    rep = {"meta": {"device": device, "date": benchlib.today(), "model": a.model,
                    "checkpoints": ckpts, "vllm": vllm.__version__, "compile": a.compile,
                    "prompt": a.prompt, "new_tokens": a.new_tokens, "rounds": a.rounds,
                    "concurrency": a.concurrency, "tp": a.tp, "tp_reduce": a.tp_reduce,
                    "note": a.note,
                    **benchlib.versions()}, "results": {}}
    stem = os.path.join(a.out, f"{benchlib.device_slug(device)}-{benchlib.today()}-vllm-"
                               f"{a.model}" + (f"-tp{a.tp}" if a.tp > 1 else ""))
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        # name -> (directory, reduction of the factored row-parallel layers)
        reduce = "rank" if a.tp_reduce == "rank" else "output"
        dirs = {"dense": (dense_dir(a.model, root), "output")}
        dirs |= {n: (d, reduce) for n, d in ckpts.items()}
        if a.tp_reduce == "both":
            dirs |= {f"{n}@rank": (d, "rank") for n, d in ckpts.items()}
        for dtype in a.dtypes:
            runs = {n: {str(c): [] for c in a.concurrency} for n in dirs}
            engines = {}
            try:
                for n, (d, red) in dirs.items():
                    log.info("%s: starting %s", dtype, n)
                    engines[n] = Engine(a, d, dtype, red)
                names = list(dirs)
                for r in range(a.rounds):
                    for c in a.concurrency:
                        for n in names[r % len(names):] + names[:r % len(names)]:
                            runs[n][str(c)].append(engines[n].run(c))
                    log.info("%s round %d: %s", dtype, r + 1, {
                        n: {c: round(x[-1], 1) for c, x in runs[n].items()} for n in names})
            finally:
                for e in engines.values():
                    e.close()
            rep["results"][dtype] = [
                {"name": n, "dir": d, "tp_reduce": red,
                 "bytes_per_token": bytes_per_token(d, dtype),
                 "tok_s": {c: statistics.median(x) for c, x in runs[n].items()},
                 "rounds": runs[n]} for n, (d, red) in dirs.items()]
            with open(stem + ".json", "w") as f:
                json.dump(rep, f, indent=1)
            with open(stem + ".md", "w") as f:
                f.write(to_markdown(rep))
    sys.stdout.write(to_markdown(rep))
    return rep


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
