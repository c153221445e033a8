"""The piece channel (cluster/serve/channel/) in one process over real TCP on 127.0.0.1: the ingress's
app over a ServeBackend whose Serve handle is a stand-in that runs the server half as a task, so
everything but Ray's routing is the production path (Inbox, Outboxes, frames, the opening).

- streams and whole answers through the channel carry what the in-process app sends;
- one step's pieces of every stream leave in one frame (frames ~ steps, not steps x streams);
- a replica whose connection breaks mid-stream is resumed on another with the same answer;
- a call that returns without its last piece is lost after the tail wait, then resumed;
- a peer without the cluster secret is refused after the fixed-size opening, and the inbox goes on.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.config import MogeConfig
from cluster.serve.channel import wire
from cluster.serve.channel.inbox import Inbox
from cluster.serve.channel.outbox import Outboxes, send_all
from cluster.serve.channel.wire import ChannelClosed, ChannelRefused
from cluster.serve.ingress import backend as backend_module
from cluster.serve.ingress.backend import LocalBackend, ServeBackend
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.ingress.pieces import Piece, merge_pieces
from cluster.serve.ingress.resume import ReplicaWatch
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.middleware.request_guard import GuardLimits
from cluster.serve.openai_server import OpenAIServer, ServedModel
from tests.unit.test_ingress_resume import ContinuingEngine, without_ids
from tests.unit.test_openai_server import KEY, LetterTokenizer, Out

SECRET = b"cluster-secret-for-tests"
WAIT_S = 30


class LockstepEngine(ContinuingEngine):
    """Every running stream gets its next token at the same 'step' (a shared tick), as the real
    engine delivers one step's outputs to all its streams at once."""

    def __init__(self, step_s: float = 0.004) -> None:
        super().__init__()
        self.step_s = step_s
        self.steps = 0
        self._tick: asyncio.Event | None = None
        self._ticker: asyncio.Task | None = None

    async def _run_ticks(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            self.steps += 1
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    def generate(self, request_id, prompt_ids, params, generated=None):
        if self._ticker is None:
            self._tick = asyncio.Event()
            self._ticker = asyncio.get_running_loop().create_task(self._run_ticks())
        if generated:
            self.continued[request_id] = list(generated)
        k = int(request_id.rsplit("-", 1)[1])
        start, n = len(generated or ()), params.max_tokens

        async def stream():
            for i in range(start, n):
                await self._tick.wait()
                tok = 97 + (i + k) % 26
                yield Out(request_id, [tok], chr(tok), i == n - 1, "length" if i == n - 1 else None)

        return stream()


class Call:
    """A Serve DeploymentResponse stand-in: awaitable, cancellable, already 'assigned'."""

    def __init__(self, coro) -> None:
        self.task = asyncio.ensure_future(coro)

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class Replicas:
    """The attention replica deployment as the ingress's handle sees it: `send_pieces.remote` runs
    AttentionReplica.send_pieces' body on one of `replicas` (round robin). `break_after`: the first
    attempt's connection is cut after that many pieces (the replica died)."""

    def __init__(self, server: OpenAIServer, replicas: int = 2, break_after: int | None = None,
                 drop_last: bool = False) -> None:
        self.server = server
        self.outboxes = [Outboxes(SECRET, f"r{i}") for i in range(replicas)]
        self.break_after, self.drop_last = break_after, drop_last
        self.attempts = 0
        self.send_pieces = self

    def options(self, **_):
        return self

    def remote(self, route, body, ctx, address, stream_id) -> Call:
        self.attempts += 1
        outboxes = self.outboxes[(self.attempts - 1) % len(self.outboxes)]
        first = self.attempts == 1
        return Call(self._run(outboxes, route, body, ctx, address, stream_id, first))

    async def _run(self, outboxes, route, body, ctx, address, stream_id, first):
        outbox = await outboxes.to(address)
        pieces = self.server.run(route, body, ctx)
        if first and self.break_after is not None:
            pieces = self._breaking(pieces, outbox)
        if first and self.drop_last:
            pieces = self._without_last(pieces)
        return await send_all(outbox, stream_id, pieces)

    async def _breaking(self, pieces, outbox):
        count = 0
        async for piece in pieces:
            if count == self.break_after:
                await asyncio.sleep(0.05)  # what was sent has arrived: then the process dies
                outbox._writer.transport.abort()
                await asyncio.sleep(3600)  # a dead replica answers nothing more (the ingress cancels)
            count += 1
            yield piece

    async def _without_last(self, pieces):
        async for piece in pieces:
            if piece.final:
                return
            yield piece


def make(engine, replicas_of=None, **server):
    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY], "max_n": 4, **server})
    metrics = ReplicaMetrics("m", engine.stats)
    srv = OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 64), cfg.server, metrics)
    inbox = Inbox(SECRET, "127.0.0.1")
    handle = (replicas_of or Replicas)(srv)
    backend = ServeBackend(handle, inbox=inbox) if replicas_of is not False else LocalBackend(srv)
    watch = ReplicaWatch(lambda: asyncio.sleep(0), period_s=0)
    app = build_http_app(backend, metrics=metrics, settings=cfg.server, watch=watch, limits=GuardLimits())
    return app, handle, inbox, metrics


async def shut(inbox: Inbox, handle: Replicas) -> None:
    """End the connections inside the test's loop (their reader tasks then end cleanly)."""
    for outboxes in handle.outboxes:
        outboxes.close()
    await inbox.stop()
    await asyncio.sleep(0.05)


def whole_then_channel(whole_app, app, handle: Replicas, inbox: Inbox, body: dict):
    """The answer of the in-process app, then that over the channel, in one loop that ends the
    connections before it closes."""
    async def main():
        try:
            return await post(whole_app, body), await post(app, body)
        finally:
            await shut(inbox, handle)

    return asyncio.run(main())


async def post(app, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"Authorization": f"Bearer {KEY}"}) as c:
        return await asyncio.wait_for(c.post("/v1/completions", json=body), WAIT_S)


def same_answer(a: httpx.Response, b: httpx.Response, stream: bool) -> bool:
    """The same text, token ids and ends per choice (and usage). Chunking may differ: a stream's
    outputs fold into fewer chunks when its consumer lags, and the channel's timing is not the
    in-process app's."""
    if not stream:
        x, y = a.json(), b.json()
        for e in (x, y):
            e.pop("id"), e.pop("created")
        return x == y

    def per_choice(r: httpx.Response) -> dict:
        out: dict = {}
        for e in without_ids(r.text):
            for c in e["choices"]:
                text, ids, end = out.get(c["index"], ("", [], None))
                out[c["index"]] = (text + c["text"], ids + (c.get("token_ids") or []), c["finish_reason"] or end)
            if e.get("usage"):
                out["usage"] = e["usage"]
        return out

    return per_choice(a) == per_choice(b) and b.text.endswith("data: [DONE]\n\n")


BODY = {"model": "m", "prompt": "hi", "max_tokens": 8, "n": 2, "seed": 5, "return_token_ids": True}


@pytest.mark.parametrize("stream", [True, False])
def test_answers_over_the_channel_are_those_of_the_in_process_app(stream):
    body = {**BODY, "stream": stream}
    local, _, _, _ = make(ContinuingEngine(), False)
    channel, handle, inbox, _ = make(ContinuingEngine())
    whole, carried = whole_then_channel(local, channel, handle, inbox, body)
    assert carried.status_code == 200 and same_answer(whole, carried, stream)
    assert handle.attempts == 1


def test_one_step_of_every_stream_leaves_in_one_frame():
    engine = LockstepEngine()
    app, handle, inbox, _ = make(engine, lambda srv: Replicas(srv, replicas=1))
    streams, tokens = 12, 16
    body = {"model": "m", "prompt": "hi", "max_tokens": tokens, "stream": True}

    async def main():
        try:
            return await asyncio.gather(*(post(app, body) for _ in range(streams)))
        finally:
            frames.append(outbox_of(handle).frames)
            await shut(inbox, handle)

    frames: list[int] = []
    answers = asyncio.run(main())
    assert all(a.status_code == 200 and a.text.endswith("data: [DONE]\n\n") for a in answers)
    pieces = streams * tokens
    # a frame per step (plus the few steps where streams were still starting), never one per piece
    assert frames[0] <= engine.steps + streams, (frames, engine.steps, pieces)
    assert frames[0] < pieces / 4


def outbox_of(handle: Replicas):
    outbox, = handle.outboxes[0]._boxes.values()
    return outbox


@pytest.mark.parametrize("stream, after", [(True, 1), (True, 4), (False, 1)])
def test_a_replica_whose_channel_breaks_is_resumed_on_another_with_the_same_answer(stream, after):
    body = {**BODY, "stream": stream}
    whole_app, _, _, _ = make(ContinuingEngine(), False)
    engine = LockstepEngine()  # a piece per step: the cut falls mid-stream
    app, handle, inbox, metrics = make(engine, lambda srv: Replicas(srv, break_after=after))
    whole, resumed = whole_then_channel(whole_app, app, handle, inbox, body)
    assert resumed.status_code == 200 and same_answer(whole, resumed, stream)
    assert handle.attempts == 2 and engine.continued and metrics.resumes._value.get() == 1


def test_a_call_that_ends_without_its_last_piece_is_lost_after_the_tail_wait(monkeypatch):
    monkeypatch.setattr(backend_module, "TAIL_WAIT_S", 0.2)
    body = {**BODY, "stream": True}
    whole_app, _, _, _ = make(ContinuingEngine(), False)
    app, handle, inbox, metrics = make(ContinuingEngine(), lambda srv: Replicas(srv, drop_last=True))
    whole, resumed = whole_then_channel(whole_app, app, handle, inbox, body)
    assert same_answer(whole, resumed, True) and handle.attempts == 2 and metrics.resumes._value.get() == 1


def test_a_peer_without_the_secret_is_refused_and_the_inbox_goes_on():
    async def main():
        inbox = Inbox(SECRET, "127.0.0.1")
        host, port = await inbox.start()
        with pytest.raises(ChannelRefused):
            await wire.dial(host, port, b"wrong", "intruder")
        # a plain client: 32 nonce bytes arrive, its garbage is refused after the fixed-size head
        reader, writer = await asyncio.open_connection(host, port)
        await reader.readexactly(wire.NONCE)
        writer.write(b"x" * (wire.NONCE + wire.TAG + 1) + b"\xff" * 10_000)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
        writer.close()
        # a replica with the secret still gets through, and its pieces reach their mailbox
        box = inbox.open()
        outboxes = Outboxes(SECRET, "r0")
        outbox = await outboxes.to((host, port))
        await outbox.send(box.stream_id, Piece(b"data", final=True))
        got = await asyncio.wait_for(box.take(), 5)
        assert inbox.connections == 1
        outboxes.close()
        await inbox.stop()
        return got

    assert [p.data for p in asyncio.run(main())] == [b"data"]


def test_mailboxes_of_a_closed_connection_fail_and_senders_to_a_gone_ingress_hear_it():
    async def main():
        inbox = Inbox(SECRET, "127.0.0.1")
        address = await inbox.start()
        a, b = inbox.open(), inbox.open()
        one, two = Outboxes(SECRET, "r1"), Outboxes(SECRET, "r2")
        out1, out2 = await one.to(address), await two.to(address)
        await out1.send(a.stream_id, Piece(b"a"))
        await out2.send(b.stream_id, Piece(b"b"))
        assert [p.data for p in await a.take()] == [b"a"] and [p.data for p in await b.take()] == [b"b"]
        out1._writer.transport.abort()  # replica 1's process is gone
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(a.take(), 5)
        await out2.send(b.stream_id, Piece(b"still"))  # replica 2's streams are untouched
        assert [p.data for p in await asyncio.wait_for(b.take(), 5)] == [b"still"]
        await inbox.stop()  # the ingress is gone
        with pytest.raises(ChannelClosed):
            async with asyncio.timeout(5):
                while True:  # the outbox hears of the end within a turn or two of the loop
                    await out2.send(b.stream_id, Piece(b"late"))
                    await asyncio.sleep(0.01)

    asyncio.run(main())


def test_merged_pieces_keep_order_the_first_headers_and_the_last_end():
    merged = merge_pieces([Piece(b"a", [(0, 1)], headers={"h": "1"}, stream=True),
                           Piece(b"b", [(1, 2)], error_status=429), Piece(b"c", [(0, 3)], final=True)])
    assert (merged.data, merged.progress, merged.headers, merged.stream, merged.final, merged.error_status) == (
        b"abc", [(0, 1), (1, 2), (0, 3)], {"h": "1"}, True, True, 429)
    assert json.dumps(merged.progress)
