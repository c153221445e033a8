"""One bad or abusive client cannot fail or freeze anyone else: real Ray Serve, real HTTP, loopback.

An app of its own (small queue bound, short body deadline) on the session's Ray:
- `top_k: 2**63`, `seed: 2**64` and a `seed + n` overflow -> 400, while 4 concurrent greedy streams
  finish with the single-process reference's tokens;
- 64 slow-body clients (headers + 9 bytes of a declared 1,000-byte body, reconnecting whenever the
  server drops them) held for SLOW_HOLD_S: /health and a normal request keep answering within 2 s,
  and the slow clients get 408;
- overload beyond the queue bound -> 429 with Retry-After, /health under 100 ms meanwhile;
- the errors are counted in /metrics by status.

    PYTHONPATH=. MOGE_SLOW_HOLD_S=30 timeout 900 python -m pytest -q tests/integration/test_hardening_http.py

MOGE_SLOW_HOLD_S (default 10 in CI; docs/reliability.md reports 30) sets the slow-client hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Iterator

import httpx
import pytest

from actors.model.reference import greedy_reference
from cluster.cli.local_cluster import LocalCluster, free_port
from cluster.config import MogeConfig
from tests.integration.test_slow_clients import slow_client

pytestmark = pytest.mark.integration

API_KEY = "sk-hardening"
MAX_NUM_SEQS, MAX_WAITING = 4, 4  # admission bound: 8 generation requests per replica
BODY_READ_TIMEOUT_S = 3.0
SLOW_CLIENTS = 64
SLOW_HOLD_S = float(os.environ.get("MOGE_SLOW_HOLD_S", "10"))
PROMPTS = ["The quick brown fox", "Elastic experts", "one two three", "MoGE groups"]


@pytest.fixture(scope="module")
def server(ray_local) -> Iterator[tuple[str, MogeConfig]]:
    config = MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"max_num_seqs": MAX_NUM_SEQS, "num_kv_blocks": 256},
        server={"host": "127.0.0.1", "port": free_port(), "api_keys": [API_KEY],
                "max_waiting_requests": MAX_WAITING, "body_read_timeout_s": BODY_READ_TIMEOUT_S, "retry_after_s": 2},
    )
    cluster = LocalCluster(config, app_name="hardening")
    try:
        yield cluster.start(timeout_s=180), config
    finally:
        cluster.stop()


def client(base_url: str, timeout: float = 60) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {API_KEY}"},
                             limits=httpx.Limits(max_connections=200))


RETRY_AFTER: list[str | None] = []  # Retry-After of every non-200 stream answer


async def stream_tokens(c: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[int, list[int]]:
    body = {"model": "tiny-moge", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "return_token_ids": True}
    tokens: list[int] = []
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            RETRY_AFTER.append(r.headers.get("retry-after"))
            return r.status_code, []
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 500, tokens
            for choice in event["choices"]:
                tokens.extend(choice.get("token_ids") or [])
    return 200, tokens


def metric(base_url: str, name: str, labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_overflowing_values_get_400_while_four_streams_keep_the_reference_tokens(server, reference_model):
    base_url, _ = server
    tok = reference_model.tokenizer
    expected = [greedy_reference(reference_model, tok.encode(p), 24) for p in PROMPTS]
    bad_bodies = [
        {"top_k": 2**63, "temperature": 0.8},
        {"seed": 2**64, "temperature": 0.8},
        {"seed": 2**63 - 1, "n": 2, "temperature": 0.8},
        {"temperature": 0.8, "top_k": 2**63 - 1},  # fits int64: must simply work (clamped to the vocabulary)
    ]

    async def main():
        async with client(base_url) as c:
            streams = [asyncio.create_task(stream_tokens(c, p, 24)) for p in PROMPTS]
            bad = [await c.post("/v1/completions", json={"model": "tiny-moge", "prompt": "x", "max_tokens": 4, **b})
                   for b in bad_bodies]
            return await asyncio.wait_for(asyncio.gather(*streams), 300), bad

    streams, bad = asyncio.run(main())
    assert [s for s, _ in streams] == [200] * 4
    assert [t for _, t in streams] == expected
    assert [r.status_code for r in bad] == [400, 400, 400, 200]
    assert "64-bit" in bad[0].json()["error"]["message"] and "seed + n" in bad[2].json()["error"]["message"]


def test_slow_body_clients_cannot_freeze_health_or_normal_requests(server, reference_model):
    base_url, _ = server
    port = int(base_url.split(":")[2].split("/")[0])
    path = base_url.split(str(port), 1)[1] + "/v1/completions"
    tok = reference_model.tokenizer
    expected = greedy_reference(reference_model, tok.encode("probe"), 4)

    async def main():
        stats = {"connections": 0, "408": 0}
        stop_at = time.monotonic() + SLOW_HOLD_S
        slow = [asyncio.create_task(slow_client(port, path, stop_at, stats, key=API_KEY, back_after_s=0))
                for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.5)  # let them connect
        health, normal = [], []
        async with client(base_url, timeout=30) as c:
            while time.monotonic() < stop_at - 1:
                t0 = time.monotonic()
                h = await c.get("/health")
                health.append((h.status_code, time.monotonic() - t0))
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json={"model": "tiny-moge", "prompt": "probe", "max_tokens": 4,
                                                          "temperature": 0, "return_token_ids": True})
                normal.append((r.status_code, time.monotonic() - t0, r.json()["choices"][0]["token_ids"]
                               if r.status_code == 200 else None))
                await asyncio.sleep(0.5)
        await asyncio.wait_for(asyncio.gather(*slow), 30)
        return stats, health, normal

    stats, health, normal = asyncio.run(main())
    print(f"slow-body hold {SLOW_HOLD_S}s: {stats}; /health max {max(d for _, d in health):.3f}s, "
          f"normal max {max(d for _, d, _ in normal):.3f}s over {len(normal)} probes")
    assert len(health) >= max(1, int(SLOW_HOLD_S / 2) - 1)
    assert all(s == 200 and d < 2 for s, d in health), health
    assert all(s == 200 and d < 2 and ids == expected for s, d, ids in normal), normal
    if SLOW_HOLD_S > BODY_READ_TIMEOUT_S + 1:
        assert stats["408"] >= SLOW_CLIENTS  # each stalled body was answered 408 at the deadline


def test_overload_beyond_the_queue_bound_gets_429_with_retry_after_and_health_stays_fast(server):
    base_url, _ = server
    before = metric(base_url, "moge_requests_total", 'route="/v1/completions",status="429"')
    RETRY_AFTER.clear()

    async def main():
        async with client(base_url) as c:
            async def timed(i):
                t0 = time.monotonic()
                status, _ = await stream_tokens(c, f"overload {i}", 48)
                return status, time.monotonic() - t0

            load = [asyncio.create_task(timed(i)) for i in range(3 * (MAX_NUM_SEQS + MAX_WAITING))]
            health = []
            async with client(base_url, timeout=10) as probe:
                while not all(t.done() for t in load):
                    t0 = time.monotonic()
                    r = await probe.get("/health")
                    health.append((r.status_code, time.monotonic() - t0))
                    await asyncio.sleep(0.05)
            done = await asyncio.wait_for(asyncio.gather(*load), 300)
            return [s for s, _ in done], [d for s, d in done if s == 200], health

    statuses, served, health = asyncio.run(main())
    latencies = sorted(d for _, d in health)
    p50, p95 = latencies[len(latencies) // 2], latencies[int(0.95 * (len(latencies) - 1))]
    median_stream = sorted(served)[len(served) // 2]
    print(f"overload: {statuses.count(200)} served, {statuses.count(429)} refused; /health max "
          f"{latencies[-1] * 1000:.0f} ms, p50 {p50 * 1000:.0f} ms over {len(health)} probes; "
          f"served stream median {median_stream * 1000:.0f} ms")
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) >= MAX_NUM_SEQS + MAX_WAITING
    assert RETRY_AFTER == ["2"] * statuses.count(429)
    # /health is answered beside the engine, never queued behind it: its median stays far under 100 ms
    # and its p95 far under what a served stream takes. The bounds leave room for the CI machine's two
    # shared cores (this client's own 24 streams share its event loop); a queued /health would take as
    # long as a stream.
    assert all(s == 200 for s, _ in health), health
    assert p50 < 0.1 and p95 < 0.25 and p95 < median_stream / 2, (latencies, median_stream)
    assert latencies[-1] < 1.0, latencies
    assert metric(base_url, "moge_requests_total", 'route="/v1/completions",status="429"') - before == statuses.count(429)


def test_415_and_405_are_answered_and_counted(server):
    base_url, _ = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = metric(base_url, "moge_requests_total", 'route="/v1/completions",status="415"')
    r = httpx.post(f"{base_url}/v1/completions", content=b'{"model": "tiny-moge", "prompt": "x"}',
                   headers={**headers, "Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert metric(base_url, "moge_requests_total", 'route="/v1/completions",status="415"') == before + 1
    r = httpx.get(f"{base_url}/v1/completions", headers=headers, timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
