"""benchmarks/serverlib.py's load generator against a stand-in OpenAI server on 127.0.0.1 (no
vLLM): tokens and their arrival times are read from the stream, and every way a request can
come back incomplete is counted as failed, never as served."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from tests.benchmarks import load_bench

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402


def _app(mode: str) -> web.Application:
    async def completions(request):
        body = await request.json()
        n, ids = body["max_tokens"], body["prompt"]
        if mode == "http-error":
            return web.json_response({"error": "boom"}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = n - 1 if mode == "short" else n
        for i in range(sent):
            last = i == sent - 1
            ev = {"choices": [{"text": "x", "token_ids": [ids[0] + i],
                               "finish_reason": ("stop" if mode == "short" else "length")
                               if last else None}]}
            await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
            await asyncio.sleep(0.001)
        usage = {"choices": [], "usage": {"completion_tokens": sent}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


async def _run(mode: str, prompts, new_tokens: int) -> dict:
    lib = load_bench("serverlib")
    runner = web.AppRunner(_app(mode))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await lib.load(f"http://127.0.0.1:{port}", "m", prompts, new_tokens, 30)
    finally:
        await runner.cleanup()


def test_load_reads_tokens_and_latencies():
    st = asyncio.run(_run("ok", [[100], [200], [300]], 5))
    assert st["ok"] == 3 and st["failed"] == []
    assert st["tokens"] == [[100 + i for i in range(5)], [200 + i for i in range(5)],
                            [300 + i for i in range(5)]]
    assert st["tok_s"] > 0 and st["ttft_ms"]["p50"] > 0
    assert st["itl_ms"]["p99"] >= st["itl_ms"]["p50"] > 0
    assert len(st["itl_gaps_ms"]) == 3 * 4


@pytest.mark.parametrize("mode,reason", [("short", "finish 'stop', 4 tokens"),
                                         ("http-error", "HTTP 500")])
def test_incomplete_requests_fail(mode, reason):
    st = asyncio.run(_run(mode, [[100], [200]], 5))
    assert st["ok"] == 0 and len(st["failed"]) == 2 and reason in st["failed"][0]


def test_percentile():
    lib = load_bench("serverlib")
    assert lib.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert lib.percentile([5.0], 99) == 5.0


def test_pooled_p99_is_the_p99_of_every_round_together():
    """Each round keeps only its largest gaps (keep_top), yet the pooled p99 equals the p99 of
    all rounds' gaps concatenated: also when one round holds every stall (the case a median of
    per-round p99s misreads), and for rounds of different sizes."""
    import random

    lib = load_bench("serverlib")
    rng = random.Random(0)
    rounds = [[rng.uniform(30, 40) for _ in range(n)] for n in (1008, 1008, 700, 1)]
    rounds[1][:16] = [rng.uniform(200, 300) for _ in range(16)]  # one stall of a 16-batch
    rounds[2][:40] = [rng.uniform(100, 500) for _ in range(40)]
    runs = [{"itl_gaps_ms": list(g)} for g in rounds]
    lib.keep_top(runs)
    assert all("itl_gaps_ms" not in r for r in runs) and len(runs[0]["itl_top_ms"]) < 1008
    want = lib.percentile([x for g in rounds for x in g], 99)
    assert lib.pooled_p99(runs) == pytest.approx(want, rel=1e-12)
    # Too few kept gaps is an error, never a wrong percentile.
    runs[2]["itl_top_ms"] = runs[2]["itl_top_ms"][:3]
    with pytest.raises(ValueError, match="below the"):
        lib.pooled_p99(runs)


def test_pooled_p99_without_gaps_is_nan():
    lib = load_bench("serverlib")
    runs = [{"itl_gaps_ms": []}, {"itl_gaps_ms": []}]
    lib.keep_top(runs)
    assert math.isnan(lib.pooled_p99(runs))
