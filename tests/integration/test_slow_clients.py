"""Slow and leaving clients against the real front (Serve proxy -> ingress -> replica), loopback only,
on the session's server.

- SLOW_CLIENTS clients send headers and 9 bytes of a declared 1,000-byte body, then stall (and come
  back 1 s after each answer; held for the whole 10 s body deadline): bodies are read in the
  ingress, so they never hold a replica slot;
  past the caps on partial bodies they get 429 at once. Meanwhile /health stays fast (median under
  100 ms, p99 under HEALTH_P99_S in tests/integration/health_bound.py: the 2-core CI machine is
  shared; docs/reliability.md has the measured p99) and a normal request within 2x its unloaded
  latency.
- 260 unauthenticated slow bodies on /admin/scale (API key set; each back 5 s after its answer):
  refused before their body is read,
  /health as fast (the same bound).
- 200 clients that leave (mid-body, and mid-stream) are counted as disconnects, never as 500s.

CI runs SLOW_CLIENTS=300; `MOGE_SLOW_CLIENTS=1000` is the big run (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time

import httpx
import pytest

from tests.integration.conftest import TEST_API_KEY as API_KEY
from tests.integration.health_bound import fast, p99

pytestmark = pytest.mark.integration

SLOW_CLIENTS = int(os.environ.get("MOGE_SLOW_CLIENTS", "300"))
HOLD_S = float(os.environ.get("MOGE_SLOW_HOLD_S", "12"))


@pytest.fixture(scope="module")
def server(moge_server) -> str:
    """The session's server (its partial-body caps are above SLOW_CLIENTS: tests/integration/conftest.py)."""
    assert moge_server.api_key == API_KEY and moge_server.config.server.body_read_timeout_s == 10
    return moge_server.base_url


def port_and_prefix(base_url: str) -> tuple[int, str]:
    port = int(base_url.split(":")[2].split("/")[0])
    return port, base_url.split(str(port), 1)[1]


async def slow_client(port: int, path: str, stop_at: float, stats: dict, key: str | None = API_KEY,
                      back_after_s: float = 1.0) -> None:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{\"model\":").encode()
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            writer.write(head)
            await writer.drain()
            stats["connections"] += 1
            line = await asyncio.wait_for(reader.readline(), max(0.1, stop_at - time.monotonic()))
            status = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else "none"
            stats[status] = stats.get(status, 0) + 1
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()
        await asyncio.sleep(back_after_s)  # a client that was answered comes back later


async def settled(stats: dict, key: str, count: int, timeout_s: float = 20) -> None:
    """Until `count` clients got as far as `key` (bounded): probes start after the connection burst."""
    deadline = time.monotonic() + timeout_s
    while stats.get(key, 0) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def metric_sum(base_url: str, pattern: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" (\S+)$", text, re.M))


async def probe_while(base_url: str, stop_at: float, normal: bool) -> tuple[list[float], list[float]]:
    """/health (and every 5th time a normal request) until stop_at, once the proxy has taken in the
    clients' connection burst (one unmeasured /health first: the burst is Serve's proxy accepting N
    connections at once, not the steady state the test is about)."""
    health, generate = [], []
    body = {"model": "tiny-moge", "prompt": "probe", "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert (await c.get("/health")).status_code == 200
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            health.append(time.monotonic() - t0)
            if normal and len(health) % 5 == 0:
                t0 = time.monotonic()
                assert (await c.post("/v1/completions", json=body)).status_code == 200
                generate.append(time.monotonic() - t0)
            await asyncio.sleep(0.05)
    return health, generate


def unloaded_latency(base_url: str) -> float:
    body = {"model": "tiny-moge", "prompt": "probe", "max_tokens": 4, "temperature": 0}
    times = []
    with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        for _ in range(6):
            t0 = time.monotonic()
            assert c.post("/v1/completions", json=body).status_code == 200
            times.append(time.monotonic() - t0)
    return statistics.median(times[1:])


def test_slow_bodies_never_delay_health_or_a_normal_request(server):
    port, prefix = port_and_prefix(server)
    unloaded = unloaded_latency(server)

    async def main():
        stats = {"connections": 0}
        stop_at = time.monotonic() + HOLD_S
        slow = [asyncio.create_task(slow_client(port, prefix + "/v1/completions", stop_at, stats))
                for _ in range(SLOW_CLIENTS)]
        await settled(stats, "connections", SLOW_CLIENTS)
        health, normal = await probe_while(server, stop_at - 0.5, normal=True)
        await asyncio.wait_for(asyncio.gather(*slow), 60)
        return stats, health, normal

    stats, health, normal = asyncio.run(main())
    print(f"{SLOW_CLIENTS} slow-body clients for {HOLD_S}s: {stats}; /health p99 {p99(health) * 1e3:.1f} ms over "
          f"{len(health)}, normal request median {statistics.median(normal) * 1e3:.0f} ms max "
          f"{max(normal) * 1e3:.0f} ms (unloaded {unloaded * 1e3:.0f} ms)")
    assert fast(health), sorted(health)[-5:]
    assert statistics.median(normal) <= 2 * unloaded and len(normal) >= 3, (normal, unloaded)
    assert set(stats) - {"connections"} <= {"408", "429"}, stats


def test_unauthenticated_slow_admin_bodies_are_refused_before_they_are_read(server):
    port, prefix = port_and_prefix(server)

    async def main():
        stats = {"connections": 0}
        stop_at = time.monotonic() + 12
        slow = [asyncio.create_task(slow_client(port, prefix + "/admin/scale", stop_at, stats, key=None,
                                                back_after_s=5.0)) for _ in range(260)]
        await settled(stats, "401", 260)
        health, _ = await probe_while(server, stop_at - 0.5, normal=False)
        await asyncio.wait_for(asyncio.gather(*slow), 60)
        return stats, health

    stats, health = asyncio.run(main())
    print(f"260 unauthenticated /admin slow bodies: {stats}; /health p99 {p99(health) * 1e3:.1f} ms")
    assert fast(health), sorted(health)[-5:]
    assert stats.get("401", 0) >= 260 and set(stats) - {"connections"} == {"401"}, stats


def test_clients_that_leave_are_disconnects_not_500s(server):
    port, prefix = port_and_prefix(server)
    errors = r'^moge_requests_total\{[^}]*status="500"[^}]*\}'
    before_500 = metric_sum(server, errors)
    before_left = metric_sum(server, r"^moge_client_disconnects_total\{[^}]*\}")

    async def leave_mid_body() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"POST {prefix}/v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\":").encode())
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.transport.abort()  # RST, no goodbye

    async def leave_mid_stream(c: httpx.AsyncClient) -> None:
        body = {"model": "tiny-moge", "prompt": "leave", "max_tokens": 64, "stream": True, "ignore_eos": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                break  # gone after the first line

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=100)) as c:
            await asyncio.gather(*(leave_mid_body() for _ in range(150)))
            await asyncio.gather(*(leave_mid_stream(c) for _ in range(50)))
        await asyncio.sleep(2)  # the server notices the last ones

    asyncio.run(main())
    assert metric_sum(server, errors) == before_500
    left = metric_sum(server, r"^moge_client_disconnects_total\{[^}]*\}") - before_left
    print(f"200 clients left: {left:.0f} disconnects counted, 0 new 500s")
    assert left >= 100
