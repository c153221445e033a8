"""The ingress half in one process over scripted backends (no Ray): a stream whose replica dies is
resumed elsewhere with the same bytes a whole run gives (n > 1, logprobs, stop strings, usage), a
request no replica takes is a 503 with Retry-After, bodies still arriving are capped, and the
admin keys are checked before an admin body is read."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.config import MogeConfig
from cluster.serve.ingress.backend import LocalBackend
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.ingress.json_body import depth, loads_bounded
from cluster.serve.ingress.pieces import RequestContext
from cluster.serve.ingress.resume import NoReplica, ReplicaLost, ReplicaWatch
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.middleware.auth import ApiKeys
from cluster.serve.middleware.request_guard import GuardLimits
from cluster.serve.openai_server import OpenAIServer, ServedModel
from tests.unit.test_openai_server import KEY, LetterTokenizer, Out


class ContinuingEngine:
    """Choice k's i-th token is chr(97 + (i + k) % 26): a continuation given `generated` goes on
    after it, as the real engine does (actors/engine/engine.py)."""

    def __init__(self) -> None:
        self.continued: dict[str, list[int]] = {}

    def generate(self, request_id, prompt_ids, params, generated=None):
        if generated:
            self.continued[request_id] = list(generated)
        k = int(request_id.rsplit("-", 1)[1])
        start = len(generated or ())
        n = params.max_tokens

        async def stream():
            for i in range(start, n):
                await asyncio.sleep(0)
                tok = 97 + (i + k) % 26
                yield Out(request_id, [tok], chr(tok), i == n - 1, "length" if i == n - 1 else None)

        return stream()

    def stats(self):
        return {}


class DyingBackend(LocalBackend):
    """The first attempt's replica dies after `after` pieces; later attempts run to the end."""

    def __init__(self, server, after: int) -> None:
        super().__init__(server)
        self.after, self.attempts = after, 0

    def pieces(self, route, body, ctx):
        self.attempts += 1
        inner = self.server.run(route, body, ctx)
        if self.attempts > 1:
            return inner
        after = self.after

        async def dying():
            count = 0
            async for piece in inner:
                if count == after:
                    await inner.aclose()
                    raise ReplicaLost("killed")
                count += 1
                yield piece

        return dying()


def make(backend_of=None, **server):
    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY], "max_n": 4, **server})
    engine = ContinuingEngine()
    metrics = ReplicaMetrics("m", engine.stats)
    srv = OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 64), cfg.server, metrics)
    backend = backend_of(srv) if backend_of else LocalBackend(srv)
    watch = ReplicaWatch(lambda: backend.call("check_ready"), period_s=0)
    app = build_http_app(backend, metrics=metrics, settings=cfg.server, watch=watch,
                         limits=GuardLimits(max_partial_bodies=3, max_partial_bodies_per_client=2))
    return app, engine, metrics


async def post(app, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {KEY}"}) as c:
        return await c.post("/v1/completions", json=body)


def without_ids(text: str) -> list[dict]:
    events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]
    for e in events:
        e.pop("created", None)
    return events


# a whole answer sends progress at most every 0.25 s: its first piece is the only one to die after
@pytest.mark.parametrize("stream, after", [(True, 1), (True, 3), (True, 6), (False, 1)])
def test_a_request_whose_replica_dies_gets_the_bytes_of_an_uninterrupted_run(after, stream):
    body = {"model": "m", "prompt": "hi", "max_tokens": 8, "n": 2, "stream": stream, "seed": 5,
            "stream_options": {"include_usage": True} if stream else None, "return_token_ids": True}
    body = {k: v for k, v in body.items() if v is not None}
    whole_app, _, _ = make()
    dying_app, engine, metrics = make(lambda srv: DyingBackend(srv, after))
    whole, resumed = asyncio.run(post(whole_app, body)), asyncio.run(post(dying_app, body))
    assert resumed.status_code == 200 and engine.continued  # it really went on from a continuation
    if stream:
        a, b = without_ids(whole.text), without_ids(resumed.text)
        for e in a + b:
            e.pop("id")
        assert a == b and resumed.text.endswith("data: [DONE]\n\n")
    else:
        a, b = whole.json(), resumed.json()
        for e in (a, b):
            e.pop("id"), e.pop("created")
        assert a == b
    assert metrics.resumes._value.get() == 1


@pytest.mark.parametrize("stream, after", [(True, 1), (True, 4), (False, 1)])
def test_a_responses_stream_whose_replica_dies_goes_on_with_the_same_events_and_ids(stream, after):
    """/v1/responses over the same journal: the events (numbering, item ids) of an uninterrupted run."""
    import re

    body = {"model": "m", "input": "hi", "max_output_tokens": 8, "stream": stream, "seed": 5}
    whole_app, _, _ = make()
    dying_app, engine, metrics = make(lambda srv: DyingBackend(srv, after))

    async def respond(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await c.post("/v1/responses", json=body)

    whole, resumed = asyncio.run(respond(whole_app)), asyncio.run(respond(dying_app))
    assert resumed.status_code == 200 and engine.continued
    same = [re.sub(r'"created_at":\d+', "", re.sub(r"(resp|msg|fc)_[0-9a-f]{24}", r"\1_", r.text)) for r in (whole, resumed)]
    assert same[0] == same[1]
    if stream:
        numbers = [json.loads(e.split("data: ", 1)[1])["sequence_number"] for e in resumed.text.split("\n\n") if "data: " in e]
        assert numbers == list(range(len(numbers))) and "event: response.incomplete" in resumed.text  # cut at 8
    assert metrics.resumes._value.get() == 1


def test_no_replica_is_a_503_with_retry_after_and_stops_new_requests_until_one_serves():
    class Nobody(LocalBackend):
        def pieces(self, route, body, ctx):
            async def never():
                raise NoReplica("no attention replica took the request within 3s")
                yield  # pragma: no cover

            return never()

    app, _, _ = make(Nobody, retry_after_s=2)
    first = asyncio.run(post(app, {"model": "m", "prompt": "hi", "max_tokens": 2}))
    assert first.status_code == 503 and first.headers["retry-after"] == "2"
    assert first.json()["error"]["code"] == "replica_unavailable"


def test_the_watch_loses_replicas_only_after_repeated_failures_and_finds_them_at_once():
    state = {"up": False}

    async def probe():
        if not state["up"]:
            raise TimeoutError

    watch = ReplicaWatch(probe, period_s=0, failures_to_lose=3)

    async def main():
        seen = []
        for _ in range(3):
            await watch.check()
            seen.append(watch.serving)
        state["up"] = True
        await watch.check()
        return seen + [watch.serving]

    assert asyncio.run(main()) == [True, True, False, True]


def test_bodies_still_arriving_are_capped_and_whole_bodies_never_wait():
    app, _, _ = make()

    async def main():
        stall = asyncio.Event()

        async def partial(client: str) -> list:
            sent, queue = [], [{"type": "http.request", "body": b'{"mo', "more_body": True}]

            async def receive():
                if queue:
                    return queue.pop(0)
                await stall.wait()
                return {"type": "http.disconnect"}

            async def send(m):
                sent.append(m)

            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
                     "root_path": "", "query_string": b"", "http_version": "1.1", "scheme": "http",
                     "server": ("t", 80), "client": (client, 1),
                     "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode())]}
            await app(scope, receive, send)
            return sent

        held = [asyncio.create_task(partial("10.0.0.1")) for _ in range(2)]
        await asyncio.sleep(0.05)
        per_client = await asyncio.wait_for(partial("10.0.0.1"), 5)  # a third from the same address
        other = asyncio.create_task(partial("10.0.0.2"))
        await asyncio.sleep(0.05)
        total = await asyncio.wait_for(partial("10.0.0.3"), 5)  # a fourth in all
        whole = await asyncio.wait_for(post(app, {"model": "m", "prompt": "hi", "max_tokens": 2}), 5)
        stall.set()
        await asyncio.wait_for(asyncio.gather(*held, other), 5)
        return per_client, total, whole

    per_client, total, whole = asyncio.run(main())
    assert per_client[0]["status"] == 429 and total[0]["status"] == 429
    assert whole.status_code == 200  # arrived whole: never counted, never refused


def test_admin_keys_are_checked_before_the_body_is_read():
    from fastapi import APIRouter

    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY], "admin_keys": ["adm"]})
    engine = ContinuingEngine()
    srv = OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 64), cfg.server, ReplicaMetrics("m"))
    app = build_http_app(srv, admin=APIRouter(prefix="/admin"), admin_keys=ApiKeys(["adm"]))
    reads = []

    async def receive():
        reads.append(1)
        await asyncio.sleep(3600)

    sent = []

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/admin/scale", "raw_path": b"/admin/scale", "root_path": "",
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode())]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert sent[0]["status"] == 401 and reads == []


def test_bounded_depth_names_the_limit_and_ignores_brackets_in_strings():
    assert depth(b'{"a": "[[[[[", "b": [[1]]}') == 3
    with pytest.raises(Exception) as e:
        loads_bounded(b"[" * 65 + b"]" * 65)
    assert "64 levels" in str(e.value)
    assert loads_bounded(b"[" * 64 + b"]" * 64) is not None


def test_a_resumed_context_keeps_id_created_and_seed():
    ctx = RequestContext()
    assert len(ctx.id_suffix) == 24 and ctx.seed < 2**48 and ctx.resume is None
