"""The HTTP front against slow and abusive clients, in one process over scripted engines (no Ray):
body-read deadline (408), total deadline (504), JSON content type (415), bounded admission (429 with
Retry-After) while /health answers, Allow on 405, and every error counted in /metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.config import MogeConfig
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.openai_server import OpenAIServer, ServedModel
from cluster.serve.middleware.request_guard import GuardLimits
from tests.unit.test_openai_server import KEY, LetterTokenizer, Out, ScriptedEngine

WAIT_S = 30
BODY = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode()


class GatedEngine(ScriptedEngine):
    """Streams wait at a gate before their first token: requests stay in flight until released."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    def generate(self, request_id, prompt_ids, params):
        inner = super().generate(request_id, prompt_ids, params)
        gate = self.gate

        async def stream():
            await gate.wait()
            async for out in inner:
                yield out

        return stream()


class BrokenEngine(ScriptedEngine):
    """A bug outside any request's control: raises before streaming, or in the middle of a stream."""

    def generate(self, request_id, prompt_ids, params):
        if params.max_tokens == 1:
            raise ZeroDivisionError("bug")

        async def stream():
            yield Out(request_id, [97], "a", False, None)
            raise ZeroDivisionError("bug mid-stream")

        return stream()


def build(engine=None, **limits):
    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY]})
    engine = engine or ScriptedEngine()
    metrics = ReplicaMetrics("m", engine.stats)
    server = OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 64), cfg.server, metrics)
    return build_http_app(server, limits=GuardLimits(**limits)), engine, metrics


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                             headers={"Authorization": f"Bearer {KEY}"})


async def raw_post(app, path: str, chunks: list[bytes], stall: asyncio.Event, declared: int) -> list[dict]:
    """Drive the ASGI app directly: send `chunks`, then stall (a slow-body client) until `stall`."""
    sent: list[dict] = []
    queue = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]

    async def receive():
        if queue:
            return queue.pop(0)
        await stall.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(declared).encode()),
                         (b"authorization", f"Bearer {KEY}".encode())]}
    await app(scope, receive, send)
    return sent


def test_a_stalled_body_gets_408_within_the_deadline_and_health_answers_meanwhile():
    app, engine, metrics = build(body_read_timeout_s=0.3)

    async def main():
        stall = asyncio.Event()
        slow = [asyncio.create_task(raw_post(app, "/v1/completions", [b'{"model": '], stall, 1000)) for _ in range(16)]
        async with client(app) as c:
            health = await asyncio.wait_for(c.get("/health"), 2)
            normal = await asyncio.wait_for(c.post("/v1/completions", content=BODY,
                                                   headers={"Content-Type": "application/json"}), 2)
        done = await asyncio.wait_for(asyncio.gather(*slow), WAIT_S)
        stall.set()
        return health, normal, done

    health, normal, done = asyncio.run(main())
    assert health.status_code == 200 and normal.status_code == 200
    for sent in done:
        assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert engine.requests.keys() == {next(iter(engine.requests))}  # only the normal request reached the engine
    assert metrics.requests.labels(route="/v1/completions", status="408")._value.get() == 16


def test_overload_beyond_the_bound_gets_429_with_retry_after_and_health_stays_fast():
    engine = GatedEngine()
    app, _, metrics = build(engine, max_in_flight=3, retry_after_s=2)

    async def main():
        async with client(app) as c:
            post = lambda: c.post("/v1/completions", content=BODY, headers={"Content-Type": "application/json"})  # noqa: E731
            held = [asyncio.create_task(post()) for _ in range(3)]
            while engine.gate.is_set() or len(engine.requests) < 3:
                await asyncio.sleep(0.01)  # bounded by wait_for below
            extra = await asyncio.wait_for(post(), 2)
            health = await asyncio.wait_for(c.get("/health"), 2)
            engine.gate.set()
            return extra, health, await asyncio.wait_for(asyncio.gather(*held), WAIT_S)

    extra, health, held = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert extra.status_code == 429 and extra.headers["retry-after"] == "2"
    assert extra.json()["error"]["code"] == "server_overloaded"
    assert health.status_code == 200 and all(r.status_code == 200 for r in held)
    assert metrics.requests.labels(route="/v1/completions", status="429")._value.get() == 1


def test_the_total_deadline_answers_504_when_nothing_was_sent():
    engine = GatedEngine()  # never released
    app, _, _ = build(engine, request_timeout_s=0.3)

    async def main():
        async with client(app) as c:
            return await asyncio.wait_for(
                c.post("/v1/completions", content=BODY, headers={"Content-Type": "application/json"}), WAIT_S)

    r = asyncio.run(main())
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_deadline_exceeded"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_gets_415(content_type):
    app, engine, _ = build()
    headers = {"Content-Type": content_type} if content_type else {}

    async def main():
        async with client(app) as c:
            return await c.post("/v1/completions", content=BODY, headers=headers)

    r = asyncio.run(main())
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert engine.requests == {}


def test_405_names_the_allowed_methods():
    app, _, _ = build()

    async def main():
        async with client(app) as c:
            return await c.get("/v1/completions")

    r = asyncio.run(main())
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.parametrize("path, status", [("/health", 405), ("/metrics", 405), ("/nowhere", 404)])
def test_a_post_where_no_post_route_is_answers_405_or_404_not_415(path, status):
    app, _, _ = build()

    async def main():
        async with client(app) as c:
            return await c.post(path, content=b"x", headers={"Content-Type": "text/plain"})

    r = asyncio.run(main())
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    if status == 405:
        assert r.headers["allow"] == "GET"


def test_every_error_is_counted_including_500s_and_errors_inside_streams():
    app, _, metrics = build(BrokenEngine())

    async def main():
        async with client(app) as c:
            j = {"Content-Type": "application/json"}
            bug = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
            stream = await c.post("/v1/completions", headers=j, content=json.dumps(
                {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}).encode())
            return bug, stream, (await c.get("/metrics")).text

    bug, stream, text = asyncio.run(main())
    assert bug.status_code == 500 and bug.json()["error"]["type"] == "server_error"
    assert stream.status_code == 200 and '"server_error"' in stream.text
    assert 'moge_requests_total{route="/v1/completions",status="500"} 1.0' in text
    assert 'moge_stream_errors_total{status="500"} 1.0' in text


def test_ready_reports_degraded_while_a_group_has_no_live_holder():
    cfg = MogeConfig.load(env={}, server={})
    engine = ScriptedEngine()
    state = {"ready": True}

    async def ready():
        return dict(state)

    server = OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 64), cfg.server, ReplicaMetrics("m"))
    app = build_http_app(server, ready=ready)

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/ready")

    assert asyncio.run(get()).status_code == 200
    state.update(ready=False, groups_without_live_holder=[3])
    r = asyncio.run(get())
    assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["groups_without_live_holder"] == [3]


def test_the_bound_counts_sequences_n_and_best_of_not_requests():
    engine = GatedEngine()
    app, _, _ = build(engine, max_in_flight=4, retry_after_s=2)

    def body(**kw) -> bytes:
        return json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2, **kw}).encode()

    async def main():
        async with client(app) as c:
            post = lambda b: c.post("/v1/completions", content=b, headers={"Content-Type": "application/json"})  # noqa: E731
            held = asyncio.create_task(post(body(n=3)))  # 3 of the 4 sequences
            while not engine.requests:
                await asyncio.sleep(0.01)  # bounded by wait_for below
            two = await asyncio.wait_for(post(body(n=1, best_of=2)), 2)  # 3 + 2 > 4
            one = asyncio.create_task(post(body()))  # 3 + 1 fits
            while len(engine.requests) < 2:
                await asyncio.sleep(0.01)
            full = await asyncio.wait_for(post(body()), 2)  # 4 + 1 > 4
            engine.gate.set()
            return two, full, await asyncio.wait_for(asyncio.gather(held, one), WAIT_S)

    two, full, done = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert two.status_code == 429 and full.status_code == 429 and two.headers["retry-after"] == "2"
    assert [r.status_code for r in done] == [200, 200]


def test_sequences_of_reads_n_and_best_of_and_falls_back_to_one():
    from cluster.serve.middleware.request_guard import sequences_of

    assert sequences_of(b'{"n": 3}') == 3 and sequences_of(b'{"n": 2, "best_of": 5}') == 5
    assert sequences_of(b'{}') == 1 and sequences_of(b'[1]') == 1 and sequences_of(b'not json') == 1
    assert sequences_of(b'{"n": true}') == 1 and sequences_of(b'{"n": -4}') == 1 and sequences_of(b'{"n": "9"}') == 1


def test_a_receive_that_ray_cancels_is_a_disconnect_however_ray_wraps_it():
    """Serve cancels the ASGI receive of a client that left; Ray may raise it as a run-time class
    RayTaskError(TaskCancelledError): both are disconnects, never a 500."""
    from ray.exceptions import RayTaskError, TaskCancelledError

    from cluster.serve.errors import is_disconnect

    wrapped = RayTaskError("receive_asgi_messages", "traceback", TaskCancelledError()).as_instanceof_cause()
    assert type(wrapped).__name__ != "TaskCancelledError"
    assert is_disconnect(TaskCancelledError()) and is_disconnect(wrapped)
    assert not is_disconnect(RayTaskError("f", "traceback", ValueError("x")).as_instanceof_cause())
