"""How the ingress reaches the server half: through a Serve handle to the attention replicas
(`ServeBackend`), or in the same process (`LocalBackend`: unit tests, one-process tools).

Both offer the same two things: `pieces(route, body, ctx)`, one attempt at a request as an async
iterator of Pieces (cluster/serve/ingress/pieces.py), and `call(name)`, a small non-streaming
question to any replica (model info, readiness, metrics text, a liveness probe).

Over Serve, the pieces have two possible carriers (`server.piece_carrier`):
- "socket" (default): the Serve call only routes, admits and cancels the request and reports the
  replica's death; the pieces come over the piece channel (cluster/serve/channel/), one connection
  per (ingress, replica) pair carrying a step's pieces of all its streams in one frame. Ray costs
  one call per request instead of one streaming message per piece (about 2-5 ms of CPU each on a
  loaded CPU host, against a 4.4 ms decode step on a GPU).
- "serve": one Serve streaming call per request attempt, a Ray message per piece (no port beyond
  Ray's own: for networks that allow nothing else between pods).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from cluster.serve.ingress.pieces import Piece, RequestContext, merge_pieces
from cluster.serve.ingress.resume import NoReplica, ReplicaLost

# a call that returned while its last piece is still on the channel (written before the call
# returned, so in flight): how long that may take before the attempt counts as lost
TAIL_WAIT_S = 10.0


class LocalBackend:
    def __init__(self, server: Any) -> None:  # cluster.serve.openai_server.OpenAIServer
        self.server = server
        self.shares_metrics = True  # one process: the server's registry is the app's

    def pieces(self, route: str, body: Any, ctx: RequestContext) -> AsyncIterator[Piece]:
        return self.server.run(route, body, ctx)

    async def call(self, name: str) -> Any:
        if name == "model_info":
            return self.server.model_info()
        if name == "metrics_text":
            return b""
        if name == "ready":
            return {"ready": True}
        return True


class ServeBackend:
    """`handle`: the attention replica deployment (cluster/serve/app.py AttentionReplica); `inbox`:
    this ingress's end of the piece channel (None: the "serve" carrier)."""

    def __init__(self, handle: Any, assign_timeout_s: float = 3.0, inbox: Any = None) -> None:
        self.handle = handle
        self.streaming = handle.options(stream=True)
        self.shares_metrics = False
        self.assign_timeout_s = assign_timeout_s
        self.inbox = inbox

    def pieces(self, route: str, body: Any, ctx: RequestContext) -> AsyncIterator[Piece]:
        if self.inbox is None:
            return self._over_serve(route, body, ctx)
        return self._over_channel(route, body, ctx)

    async def _assigned(self, response: Any) -> None:
        """Serve's router holds a call until some replica takes it: with the only replica dead that
        is until its replacement serves (10+ s). Bounded here; the admission bound (429) is below
        max_ongoing_requests, so a busy replica refuses rather than queues."""
        assigned = getattr(response, "_fetch_future_result_async", None)
        if assigned is None:
            return
        try:
            async with asyncio.timeout(self.assign_timeout_s):
                await assigned()
        except TimeoutError:
            raise NoReplica(f"no attention replica took the request within {self.assign_timeout_s:g}s") from None

    async def _over_channel(self, route: str, body: Any, ctx: RequestContext) -> AsyncIterator[Piece]:
        address = await self.inbox.start()
        box = self.inbox.open()
        response = self.handle.send_pieces.remote(route, body, ctx, address, box.stream_id)
        call: asyncio.Future | None = None
        finished = False
        try:
            await self._assigned(response)
            call = asyncio.ensure_future(_result(response))
            call.add_done_callback(lambda f: _call_ended(f, box))
            while not finished:
                piece = merge_pieces(await box.take())
                finished = piece.final
                yield piece
        finally:
            self.inbox.close(box)
            if not finished:
                response.cancel()  # the replica aborts the request (a no-op once it ended)
            if call is not None and not call.done():
                call.cancel()
            box.fail(ReplicaLost("closed"))  # drops a pending tail timer

    async def _over_serve(self, route: str, body: Any, ctx: RequestContext) -> AsyncIterator[Piece]:
        # One Serve streaming call per attempt: each item is a Piece (a batch of the request's
        # outputs), never one Ray message per token.
        response = self.streaming.generate.remote(route, body, ctx)
        try:
            await self._assigned(response)
            async for piece in response:
                yield piece
        finally:
            response.cancel()  # a no-op once it finished; otherwise the replica aborts the request

    async def call(self, name: str) -> Any:
        return await getattr(self.handle, name).remote()


async def _result(response: Any) -> Any:
    return await response


def _call_ended(call: asyncio.Future, box: Any) -> None:
    """A call that failed (the replica's death, as Ray reports it) fails its mailbox; one that
    returned wrote its last piece before it did, so that piece is on the channel: it gets
    TAIL_WAIT_S to arrive."""
    if call.cancelled():
        return
    error = call.exception()
    if error is not None:
        box.fail(error)
    else:
        box.fail_after(TAIL_WAIT_S, ReplicaLost("the replica's call ended before its last piece arrived"))
