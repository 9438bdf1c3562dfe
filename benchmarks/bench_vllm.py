"""vLLM dense vs vLLM serving factored checkpoints, as users meet it: decode under load, prefill,
and the OpenAI server with concurrent streaming clients.

    python benchmarks/bench_vllm.py --model smollm2-135m \\
        --ckpt pgsvd-20=ckpts/smollm2-pgsvd-20 --ckpt pgsvd-40=ckpts/smollm2-pgsvd-40 \\
        [--compile] [--concurrency 1 16 64] [--prefill 8x512] [--server] --out benchmarks/results

Variants: ``dense`` (``--model`` as a plain HF directory, ``pgsvd serve``'s copy in the cache)
and every ``--ckpt NAME=DIR`` (a factored checkpoint, served through the pgsvd quantization
method, no extra flag). Per dtype every variant's engine is started once and kept alive in its
own subprocess (this script with ``--worker``, warmed up at every load); then the variants take
turns, one generation each, load by load, round by round (``--rounds``, the order rotated each
round), so a shared machine's drifting load hits all alike; the median over rounds is
reported. An idle engine waits on its stdin and uses no CPU.

Loads, in process (``vllm.LLM``):
- ``--concurrency`` c: c requests of ``--prompt`` random tokens, each generating
  ``--new-tokens`` greedy tokens (ignore_eos), submitted together; output tokens/s = c T / wall.
  At c = 1 this is one request's decode rate (its prefill included).
- ``--prefill NxL`` (default 8x512): N prompts of L random tokens, one new token each; prompt
  tokens/s = N L / wall.
``--server``: then every variant is served by ``pgsvd serve`` (vLLM's OpenAI server) on
127.0.0.1, all at once on their own ports, and for each ``--server-clients`` N (default 16 64)
the variants take turns under N concurrent streaming clients (``serverlib.py``: one
completion each, the decode loads' prompt and token counts), round by round: output tokens/s,
time to first token and inter-token latency p50/p99 (the ITL p99 over every round's gaps
together: ``serverlib.pooled_p99``), requests answered whole (finish reason
``length``, every token; a failure is logged and counted, never dropped from the count), and how
many greedy responses equal the offline generation of the same prompts by the in-process engine.
Each server is stopped by this script at the end (or on error); each load is bounded by
``--server-timeout``.

Beside each ratio against dense, the ideal one: bytes of weights read per decoded token, every
tensor of the checkpoint but the input embedding, plus the head (the tied embedding when tied),
at the served dtype; at prefill the same ratio is the FLOPs ratio of those weights. Engines run
eager (``--compile`` for vLLM's torch.compile, its default mode; it costs minutes per start on
a small CPU). ``--tp T`` serves every variant with tensor parallelism T (on the CPU: T ranks of
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
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import serverlib  # noqa: E402

from pgsvd_rt.integrations.serve import hf_directory  # noqa: E402

log = logging.getLogger("bench_vllm")
DTYPES = ("bfloat16", "float32", "float16")


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

    llm = LLM(model=a.worker, dtype=a.dtype, max_model_len=max_len(a),
              tensor_parallel_size=a.tp, enforce_eager=not a.compile,
              kv_cache_memory_bytes=int(a.kv_cache_gib * 2**30), seed=0)
    sp = SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True)
    rng = random.Random(0)

    def run(prompts, params):
        t0 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return res, time.perf_counter() - t0

    loads = [c for c in a.concurrency] + ([a.prefill] if a.prefill else [])
    for c in loads:  # warm-up: every batch shape once
        handle(c, rng, run, sp, a)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "RUN":
            print("BENCH " + json.dumps(handle(arg, rng, run, sp, a)), flush=True)
        elif cmd == "SPLIT":  # the load timed, then profiled: its wall time in the linears
            from profile_vllm import split_linears
            from torch.profiler import ProfilerActivity, profile

            wall = handle(arg, rng, run, sp, a)["wall_s"]
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                handle(arg, rng, run, sp, a)
            vocab = llm.llm_engine.model_config.hf_config.vocab_size
            print("SPLIT " + json.dumps({"wall_s": wall, **split_linears(prof, vocab)}),
                  flush=True)
        elif cmd == "TOKENS":  # offline greedy tokens of the given prompts, in one batch
            res, _ = run(json.loads(arg), sp)
            print("TOKENS " + json.dumps([list(r.outputs[0].token_ids) for r in res]), flush=True)
        else:
            break


def handle(load, rng, run, sp, a) -> dict:
    """One timed generation: ``c`` requests decoding --new-tokens each (output tokens/s), or
    the prefill case ``NxL``: N prompts of L tokens, one new token each (prompt tokens/s)."""
    from vllm import SamplingParams

    load = str(load)
    if "x" in load:
        n, length = map(int, load.split("x"))
        prompts = [[rng.randrange(100, 20000) for _ in range(length)] for _ in range(n)]
        res, wall = run(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        return {"load": load, "tok_s": n * length / wall, "wall_s": wall}
    c = int(load)
    prompts = [[rng.randrange(100, 20000) for _ in range(a.prompt)] for _ in range(c)]
    res, wall = run(prompts, sp)
    return {"load": load, "tok_s": sum(len(r.outputs[0].token_ids) for r in res) / wall,
            "wall_s": wall}


def max_len(a) -> int:
    """The engines' context: the decode prompts plus their new tokens, and the prefill prompts."""
    prefill = int(a.prefill.split("x")[1]) + 1 if a.prefill else 0
    return max(a.prompt + a.new_tokens, prefill) + 8


class Engine:
    """A worker subprocess holding one engine (``worker``); ``run(c)`` times one generation."""

    def __init__(self, a, directory: str, dtype: str, tp_reduce: str = "output") -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", directory, "--dtype", dtype,
               "--prompt", str(a.prompt), "--new-tokens", str(a.new_tokens), "--kv-cache-gib",
               str(a.kv_cache_gib), "--concurrency", *map(str, a.concurrency), "--out", a.out,
               "--tp", str(getattr(a, "tp", 1)), "--prefill", a.prefill or "none"]
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

    def run(self, load) -> float:
        """tok/s of one timed generation at ``load`` (a concurrency, or the prefill NxL)."""
        self.p.stdin.write(f"RUN {load}\n")
        self.p.stdin.flush()
        return json.loads(self._read("BENCH "))["tok_s"]

    def split(self, load) -> dict:
        """``load`` timed, then profiled: wall_s, linear_ms and head_ms (profile_vllm.py)."""
        self.p.stdin.write(f"SPLIT {load}\n")
        self.p.stdin.flush()
        return json.loads(self._read("SPLIT "))

    def tokens(self, prompts: list[list[int]]) -> list[list[int]]:
        """Offline greedy tokens of ``prompts`` (one batch)."""
        self.p.stdin.write("TOKENS " + json.dumps(prompts) + "\n")
        self.p.stdin.flush()
        return json.loads(self._read("TOKENS "))

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
    c = str(c)
    ratios = [a / b for a, b in zip(r["rounds"][c], dense["rounds"][c], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _loads(m: dict) -> list[str]:
    return m.get("loads") or [str(c) for c in m["concurrency"]]


def _head(load: str) -> str:
    return f"prefill {load}" if "x" in load else f"c={load}"


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"# vLLM serving on {m['device']} ({m['date']}): {m['model']}", ""]
    if m.get("isa") == "avx2":
        lines += ["Run as an AVX2-only CPU (`--isa avx2`): our kernels' AVX2 sets forced, oneDNN "
                  "and MKL capped at AVX2 (`benchlib.AVX2_ENV`); vLLM's own kernels as built.",
                  ""]
    if m.get("isa") == "amx":
        lines += ["`--isa amx`: the factored engines' bf16 calls of 16 rows or more on our AMX "
                  "tiles (`PGSVD_AMX=1`).", ""]
    if m.get("note"):  # what the numbers alone do not say (the commit measured, the machine)
        lines += [m["note"], ""]
    lines += [f"vLLM {m['vllm']}, {'compiled' if m['compile'] else 'eager'}, "
              f"tensor parallel {m.get('tp', 1)}, prompt {m['prompt']} "
              f"tokens, {m['new_tokens']} new tokens per request, median of {m['rounds']} rounds "
              "(engines kept alive, variants taking turns). Command: `"
              + m.get("command", "python benchmarks/bench_vllm.py") + "`. "
              "tok/s = output tokens/s over all requests "
              "(prefill NxL: N prompts of L tokens, one new token each; prompt tokens/s); "
              "paired = median over rounds of the ratio to dense in the same round (range in "
              "brackets); ideal = dense's bytes of weights per token over the variant's (= the "
              "FLOPs ratio); bound = the most the variant can gain with its linears at their "
              "ideal and the rest of dense's step as a profile of the same load measured it "
              "(see profile_bound); frac = paired / ideal, paired / bound.", ""]
    for dtype, rows in rep["results"].items():
        dense = rows[0]
        lines += [f"## {dtype}", "",
                  "| variant | load | tok/s | paired vs dense | ideal | frac ideal | bound | "
                  "frac bound |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ideal = dense["bytes_per_token"] / r["bytes_per_token"]
            for c in _loads(m):
                med, lo, hi = paired(r, dense, c)
                bound = profile_bound(dense, r, c)
                lines.append(
                    f"| {r['name']} | {_head(c)} | {r['tok_s'][c]:.1f} | {med:.2f}x "
                    f"({lo:.2f}-{hi:.2f}) | {ideal:.2f}x | {med / ideal:.2f} | "
                    + (f"{bound:.2f}x | {med / bound:.2f} |" if bound else "- | - |"))
        lines.append("")
        if dtype in rep.get("server", {}):
            lines += serverlib.server_markdown(rep["server"][dtype], m, dense, rows)
    return "\n".join(lines)


def profile_bound(dense: dict, r: dict, c: str) -> float | None:
    """The most a variant can gain at load ``c`` with its linears at their ideal and the rest of
    dense's step as measured: T / (T - L + L / kappa), T dense's wall, L the time of its decoder
    linears in a profile of the same load (the head and everything else stay), kappa the bytes
    (= FLOPs) ratio of the decoder linears. None where the report has no profile."""
    split = dense.get("split", {}).get(c)
    if not split or not r.get("linear_elems"):
        return None
    kappa = dense["linear_elems"] / r["linear_elems"]
    T, L = split["wall_s"], min(split["linear_ms"] / 1e3, split["wall_s"])
    return T / (T - L + L / kappa)


def summary(paths: list[str]) -> str:
    """The README's speed tables over saved reports: per report, dtype and factored variant,
    each load's paired speedup over dense with its fraction of the profile bound (of the bytes
    ideal where the report has no profile); then, for reports with a server mode, the server's
    paired tok/s and its p99 inter-token latency over dense's (below 1 = better than dense)."""
    rows, srows = [], []
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        m, srv = rep["meta"], rep.get("server", {})
        cpu = m["device"].split(",")[0].removeprefix("CPU: ")
        cpu += benchlib.ISAS[m.get("isa", "auto")][2]
        for dtype, res in rep["results"].items():
            dense = res[0]
            for r in res[1:]:
                head = (f"| {cpu}, {m['date']} | {m['model']} | {r['name']} | {dtype} | "
                        f"{'compiled' if m['compile'] else 'eager'} | ")
                ideal = dense["bytes_per_token"] / r["bytes_per_token"]
                cells = []
                prefill = next((c for c in _loads(m) if "x" in c), "none")
                for c in ("1", "16", "64", prefill):
                    if c not in r["tok_s"]:
                        cells.append("-")
                        continue
                    med = paired(r, dense, c)[0]
                    bound = profile_bound(dense, r, c) or ideal
                    cells.append(f"{med:.2f}x ({med / bound:.2f})")
                rows.append(head + " | ".join(cells) + " |")
                s = srv.get(dtype, {})
                if r["name"] not in s:
                    continue
                cells = []
                for c in ("16", "64"):
                    if c not in s[r["name"]]:
                        cells.append("-")
                        continue
                    itl = (serverlib.itl_p99(s, r["name"], c)
                           / serverlib.itl_p99(s, dense["name"], c))
                    cells.append(f"{serverlib.server_paired(s, r['name'], dense['name'], c):.2f}x"
                                 f" / {itl:.2f}")
                srows.append(head + " | ".join(cells) + " |")
    head = "| CPU, date | model | variant | dtype | vLLM | "
    out = [head + "c=1 | c=16 | c=64 | prefill |", "|---|---|---|---|---|---|---|---|---|", *rows]
    if srows:
        out += ["", head + "server, 16 clients | server, 64 clients |",
                "|---|---|---|---|---|---|---|", *srows]
    return "\n".join(out + [""])


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
    p.add_argument("--summary", metavar="JSON", nargs="+",
                   help="print one table over saved reports (the README's) and exit")
    p.add_argument("--model", default="smollm2-135m", help="the dense model (a pgsvd spec)")
    p.add_argument("--ckpt", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="vLLM KV-cache size per engine (kv_cache_memory_bytes)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--prefill", default="8x512", help="the prefill case NxL (N prompts of L "
                   "tokens, one new token each); 'none' to skip")
    p.add_argument("--server", action="store_true", help="also through the OpenAI server "
                   "(`pgsvd serve` on 127.0.0.1), --server-clients concurrent streaming clients")
    p.add_argument("--server-clients", type=int, nargs="+", default=[16, 64])
    p.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds a server may take to start, and one load to finish")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--tp-reduce", choices=["output", "rank", "both"], default="output",
                   help="the factored checkpoints' row-parallel reduction (see the header)")
    p.add_argument("--isa", choices=list(benchlib.ISAS), default="auto",
                   help="avx2: the engines run as on an AVX2-only CPU (benchlib.AVX2_ENV); amx: "
                   "the factored engines' bf16 calls of >= 16 rows on the AMX tiles (PGSVD_AMX=1)")
    p.add_argument("--note", default="", help="a line for the report: what the numbers alone "
                   "do not say (the commit, the machine)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.prefill = None if a.prefill in ("none", "") else a.prefill
    if a.prefill and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", a.prefill):
        p.error(f"--prefill must be NxL (e.g. 8x512) or 'none', got {a.prefill!r}")
    if a.worker:
        return worker(a)
    if a.render:
        sys.stdout.write(render(a.render))
        return None
    if a.summary:
        sys.stdout.write(summary(a.summary))
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
    if a.isa == "amx":
        from pgsvd_rt.ops import _native

        if not (_native.load() and _native.module.amx_available()):
            p.error("--isa amx: this CPU has no AMX-TILE/AMX-BF16 (or the kernel refused them, or "
                    "pgsvd_rt._C is not built)")
    os.environ.update(benchlib.ISAS[a.isa][0])  # the engines' processes inherit it
    import vllm

    device = benchlib.device_name("cuda" if _cuda() else "cpu")
    loads = [str(c) for c in a.concurrency] + ([a.prefill] if a.prefill else [])
    rep = {"meta": {"device": device, "date": benchlib.today(), "model": a.model,
                    "checkpoints": ckpts, "vllm": vllm.__version__, "compile": a.compile,
                    "prompt": a.prompt, "new_tokens": a.new_tokens, "rounds": a.rounds,
                    "concurrency": a.concurrency, "loads": loads, "tp": a.tp,
                    "tp_reduce": a.tp_reduce, "note": a.note, "isa": a.isa,
                    "command": benchlib.command(__file__),
                    "server_clients": a.server_clients if a.server else None,
                    **benchlib.versions()}, "results": {}, "server": {}}
    slug = benchlib.device_slug(device) + benchlib.ISAS[a.isa][1]
    stem = os.path.join(a.out, f"{slug}-{benchlib.today()}-vllm-{a.model}"
                               + (f"-tp{a.tp}" if a.tp > 1 else ""))
    os.makedirs(a.out, exist_ok=True)
    # name -> (directory, reduction of the factored row-parallel layers)
    reduce = "rank" if a.tp_reduce == "rank" else "output"
    dirs = {"dense": (str(hf_directory(a.model)), "output")}
    dirs |= {n: (d, reduce) for n, d in ckpts.items()}
    if a.tp_reduce == "both":
        dirs |= {f"{n}@rank": (d, "rank") for n, d in ckpts.items()}
    names = list(dirs)
    for dtype in a.dtypes:
        runs = {n: {c: [] for c in loads} for n in dirs}
        prompts = ({c: serverlib.server_prompts(c, a.prompt) for c in a.server_clients}
                   if a.server else {})
        offline, splits, engines = {}, {}, {}
        try:
            for n, (d, red) in dirs.items():
                log.info("%s: starting %s", dtype, n)
                engines[n] = Engine(a, d, dtype, red)
            for r in range(a.rounds):
                for c in loads:
                    for n in names[r % len(names):] + names[:r % len(names)]:
                        runs[n][c].append(engines[n].run(c))
                log.info("%s round %d: %s", dtype, r + 1, {
                    n: {c: round(x[-1], 1) for c, x in runs[n].items()} for n in names})
            offline = {n: {c: engines[n].tokens(pr) for c, pr in prompts.items()} for n in names}
            splits = {c: engines["dense"].split(c) for c in loads} if a.tp == 1 else {}
        finally:
            for e in engines.values():
                e.close()
        rep["results"][dtype] = [
            {"name": n, "dir": d, "tp_reduce": red,
             "bytes_per_token": benchlib.bytes_per_token(d, dtype),
             "linear_elems": benchlib.linear_elems(d),
             **({"split": splits} if n == "dense" else {}),
             "tok_s": {c: statistics.median(x) for c, x in runs[n].items()},
             "rounds": runs[n]} for n, (d, red) in dirs.items()]
        if a.server:
            rep["server"][dtype] = serverlib.server_rounds(a, dirs, dtype, prompts, offline,
                                                           max_len(a))
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
