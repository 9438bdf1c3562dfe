"""bench_vllm.py's server mode: servers started with ``pgsvd serve``, and load from N concurrent
streaming clients on an OpenAI-compatible server: each client sends one completion request
(prompt as token ids, greedy, a fixed number of new tokens, ``ignore_eos``, streamed with token
ids) and records when each token arrived.

    stats = asyncio.run(load(url, model, prompts, new_tokens, timeout_s))

Every request must be answered whole: HTTP 200, finish reason ``length``, exactly
``new_tokens`` tokens, no error event; anything else is counted in ``failed`` with its reason
(the caller decides what a failure means; bench_vllm refuses to report a run with one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

log = logging.getLogger("bench_vllm")


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _one(session, url: str, model: str, ids: list[int], new_tokens: int) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, tokens, finish, usage, error = [], [], None, None, None
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {(await r.text())[:200]}", "tokens": []}
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                error = str(ev["error"])[:200]
                break
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                delta = ch.get("token_ids") or []
                if delta:
                    now = time.perf_counter()
                    arrivals += [now] * len(delta)
                    tokens += delta
                finish = ch.get("finish_reason") or finish
    done = time.perf_counter()
    if error is None and (finish != "length" or len(tokens) != new_tokens
                          or (usage or {}).get("completion_tokens") != new_tokens):
        error = (f"finish {finish!r}, {len(tokens)} tokens streamed, usage "
                 f"{(usage or {}).get('completion_tokens')}, expected 'length' and {new_tokens}")
    return {"error": error, "tokens": tokens, "t0": t0, "arrivals": arrivals, "done": done}


async def load(url: str, model: str, prompts: list[list[int]], new_tokens: int,
               timeout_s: float) -> dict:
    """All prompts at once, one client each. Returns the run's statistics (module doc) and each
    request's tokens (for comparison with offline generation)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    conn = aiohttp.TCPConnector(limit=len(prompts))
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[_one(session, url, model, p, new_tokens) for p in prompts],
                                   return_exceptions=True)
        wall = time.perf_counter() - t0
    ok = [r for r in res if isinstance(r, dict) and r["error"] is None]
    failed = [repr(r) if not isinstance(r, dict) else r["error"] for r in res
              if not isinstance(r, dict) or r["error"] is not None]
    ttft = [r["arrivals"][0] - r["t0"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    return {"requests": len(prompts), "ok": len(ok), "failed": failed, "wall_s": wall,
            "tok_s": sum(len(r["tokens"]) for r in ok) / wall,
            "ttft_ms": {"p50": 1e3 * percentile(ttft, 50), "p99": 1e3 * percentile(ttft, 99)},
            "itl_ms": {"p50": 1e3 * percentile(itl, 50), "p99": 1e3 * percentile(itl, 99),
                       "mean": 1e3 * statistics.fmean(itl) if itl else float("nan")},
            "itl_gaps_ms": [round(1e3 * x, 3) for x in itl],  # to the microsecond
            "tokens": [r["tokens"] if isinstance(r, dict) else [] for r in res]}


# The p99 inter-token latency of a variant is taken over every gap of every round together.
# A round's own p99 is the wrong statistic at 16 clients: one stall of the whole batch (the
# server pausing 0.1-0.5 s mid-stream, seen on dense and factored servers alike) is 16 of the
# round's 1008 gaps, so a round's p99 measures whether one such stall happened in it. Each
# round keeps its largest gaps, enough of them that the pooled p99 is exact (see keep_top).
P99 = 99.0


def keep_top(rounds: list[dict]) -> None:
    """Replace each round's ``itl_gaps_ms`` by ``itl_n`` (how many gaps) and ``itl_top_ms`` (its
    largest gaps, descending): every gap above the pooled p99 of all ``rounds`` lies in its
    own round's top ceil(1% of all gaps) + 2, so :func:`pooled_p99` needs no more."""
    n = sum(len(r["itl_gaps_ms"]) for r in rounds)
    k = math.ceil(n * (100 - P99) / 100) + 2
    for r in rounds:
        gaps = r.pop("itl_gaps_ms")
        r["itl_n"], r["itl_top_ms"] = len(gaps), sorted(gaps, reverse=True)[:k]


def pooled_p99(rounds: list[dict]) -> float:
    """The p99 (ms) of every inter-token gap of ``rounds`` together (as :func:`percentile` of
    their concatenation), from the rounds' ``itl_n`` and ``itl_top_ms``."""
    n = sum(r["itl_n"] for r in rounds)
    if n == 0:
        return float("nan")
    pos = (n - 1) * P99 / 100  # index in ascending order, as percentile() interpolates
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    need = n - lo  # the pooled top `need` gaps reach down to index lo
    for i, r in enumerate(rounds):  # each lies in its own round's top `need`
        if len(r["itl_top_ms"]) < min(need, r["itl_n"]):
            raise ValueError(f"pooled_p99: round {i} kept {len(r['itl_top_ms'])} of its "
                             f"{r['itl_n']} gaps, below the {need} the p99 of {n} needs")
    top = sorted((x for r in rounds for x in r["itl_top_ms"]), reverse=True)

    def ascending(i: int) -> float:
        return top[n - 1 - i]  # the same element counted from the top

    return ascending(lo) + (ascending(hi) - ascending(lo)) * (pos - lo)


def server_prompts(c: int, length: int) -> list[list[int]]:
    """The server mode's c prompts of ``length`` random tokens (the same for every variant)."""
    import random

    rng = random.Random(1000 + c)
    return [[rng.randrange(100, 20000) for _ in range(length)] for _ in range(c)]


def server_rounds(a, dirs: dict, dtype: str, prompts: dict, offline: dict,
                  max_model_len: int) -> dict:
    """bench_vllm.py's server mode: every variant (``dirs``: name -> (directory, TP
    reduction)) served by ``pgsvd serve`` at once, each on its own port and idle while the
    others run; the variants take turns at each client count, round by round (``a``: the
    benchmark's arguments). Returns name -> clients -> [per-round statistics of :func:`load`,
    with ``same_as_offline``: how many responses equal ``offline`` name -> clients -> tokens].
    Every server is stopped before this returns, also on error."""
    from pgsvd_rt.integrations.serve import stop, wait_ready

    servers, out = {}, {n: {str(c): [] for c in prompts} for n in dirs}
    try:
        for n, (d, red) in dirs.items():
            port = _free_port()
            cmd = [sys.executable, "-m", "pgsvd_rt.cli", "serve", d, "--port", str(port),
                   "--dtype", dtype, "--max-model-len", str(max_model_len), "--kv-cache-gib",
                   str(a.kv_cache_gib), "--"] + ([] if a.compile else ["--enforce-eager"])
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PGSVD_VLLM_TP_REDUCE"] = red
            err = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                    start_new_session=True)
            servers[n] = (proc, f"http://127.0.0.1:{port}", d, err)
            log.info("%s: serving %s on port %d", dtype, n, port)
        for proc, url, d, err in servers.values():
            try:
                wait_ready(url, proc, a.server_timeout)
            except (RuntimeError, TimeoutError) as exc:
                err.seek(0)
                raise RuntimeError(f"pgsvd serve {d}: {exc}\n{err.read()[-3000:]}") from None
            for pr in prompts.values():  # warm-up: every batch shape once
                asyncio.run(load(url, d, pr, a.new_tokens, a.server_timeout))
        names = list(dirs)
        for r in range(a.rounds):
            for c, pr in prompts.items():
                for n in names[r % len(names):] + names[:r % len(names)]:
                    proc, url, d, _ = servers[n]
                    st = asyncio.run(load(url, d, pr, a.new_tokens,
                                                      a.server_timeout))
                    if st["failed"]:
                        log.warning("%s %s c=%d: %d requests failed: %s", dtype, n, c,
                                    len(st["failed"]), st["failed"][:3])
                    st["same_as_offline"] = sum(t == o and len(t) > 0 for t, o in
                                                zip(st.pop("tokens"), offline[n][c],
                                                    strict=True))
                    out[n][str(c)].append(st)
            log.info("%s server round %d: %s", dtype, r + 1, {
                n: {c: round(x[-1]["tok_s"], 1) for c, x in out[n].items()} for n in names})
        for per_clients in out.values():
            for runs in per_clients.values():
                keep_top(runs)
    finally:
        for proc, _, _, err in servers.values():
            stop(proc)
            err.close()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_paired(srv: dict, name: str, dense: str, c: str) -> float:
    """Median over rounds of a variant's output tokens/s over dense's in the same round."""
    return statistics.median(x["tok_s"] / d["tok_s"]
                             for x, d in zip(srv[name][c], srv[dense][c], strict=True))


def itl_p99(srv: dict, name: str, c: str) -> float:
    """The p99 inter-token latency (ms) of ``c`` clients over every round's gaps together."""
    return pooled_p99(srv[name][c])


def server_markdown(srv: dict, m: dict, dense: dict, rows: list[dict]) -> list[str]:
    """The server mode's table for one dtype (medians over rounds; the ITL p99 pooled)."""
    clients = " and ".join(str(c) for c in m["server_clients"])
    lines = [f"### OpenAI server (`pgsvd serve`), {clients} concurrent streaming clients", "",
             f"Each client: one completion of {m['prompt']} prompt tokens, {m['new_tokens']} "
             "greedy new tokens (ignore_eos), streamed with token ids. ok = requests answered "
             "whole (finish reason length, every token) over all rounds; same as offline = "
             "greedy responses equal to the offline generation (vLLM's LLM.generate, one batch) "
             "of the same prompts; TTFT / ITL = time to first token / between tokens, "
             "milliseconds: p50 the median over rounds, ITL p99 over every gap of every round "
             "together (a round's own p99 at 16 clients is set by one stall of the batch).", "",
             "| variant | clients | tok/s | paired vs dense | TTFT p50 / p99 | ITL p50 / p99 | "
             "ok | same as offline |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for c, runs in srv[r["name"]].items():
            def med(f, runs=runs):
                return statistics.median(f(x) for x in runs)

            pair = server_paired(srv, r["name"], dense["name"], c)
            ok = sum(x["ok"] for x in runs)
            lines.append(
                f"| {r['name']} | {c} | {med(lambda x: x['tok_s']):.1f} | {pair:.2f}x | "
                f"{med(lambda x: x['ttft_ms']['p50']):.0f} / "
                f"{med(lambda x: x['ttft_ms']['p99']):.0f} | "
                f"{med(lambda x: x['itl_ms']['p50']):.1f} / "
                f"{pooled_p99(runs):.1f} | {ok}/{sum(x['requests'] for x in runs)}"
                f" | {sum(x['same_as_offline'] for x in runs)}/{ok} |")
    return lines + [""]
