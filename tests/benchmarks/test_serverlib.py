"""benchmarks/serverlib.py's load generator against a stand-in OpenAI server on 127.0.0.1 (no
vLLM): tokens and their arrival times are read from the stream, and every way a request can
come back incomplete is counted as failed, never as served."""

from __future__ import annotations

import asyncio
import json

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


@pytest.mark.parametrize("mode,reason", [("short", "finish 'stop', 4 tokens"),
                                         ("http-error", "HTTP 500")])
def test_incomplete_requests_fail(mode, reason):
    st = asyncio.run(_run(mode, [[100], [200]], 5))
    assert st["ok"] == 0 and len(st["failed"]) == 2 and reason in st["failed"][0]


def test_percentile():
    lib = load_bench("serverlib")
    assert lib.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert lib.percentile([5.0], 99) == 5.0
