"""Streaming clients in their own process (so they share no interpreter lock with the server they
measure): `python tests/unit/stream_clients.py BASE_URL STREAMS MAX_TOKENS` opens STREAMS
connections, then sends STREAMS streaming completions at once and prints one JSON line: each
request's time to its first token-carrying SSE event, and the /metrics text before and after."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

LIMIT_S = 120


async def first_token(client: httpx.AsyncClient, i: int, max_tokens: int) -> float:
    body = {"model": "tiny-moge", "prompt": f"request {i} waits its turn", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    start = time.monotonic()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["token_ids"]:
                first = time.monotonic() - start
    if first is None:
        raise RuntimeError(f"request {i} streamed no token")
    return first


async def main(base: str, streams: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:
        warm = {"model": "tiny-moge", "prompt": "warm", "max_tokens": 1}
        for r in await asyncio.gather(*(client.post("/v1/completions", json=warm) for _ in range(streams))):
            r.raise_for_status()
        before = (await client.get("/metrics")).text
        seen = await asyncio.wait_for(asyncio.gather(*(first_token(client, i, max_tokens) for i in range(streams))),
                                      LIMIT_S)
        after = (await client.get("/metrics")).text
    return {"ttft_s": seen, "before": before, "after": after}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))))
