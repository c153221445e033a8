"""How the ingress reaches the server half: through a Serve handle to the attention replicas
(`ServeBackend`), or in the same process (`LocalBackend`: unit tests, one-process tools).

Both offer the same two things: `pieces(route, body, ctx)`, one attempt at a request as an async
iterator of Pieces (cluster/serve/ingress/pieces.py), and `call(name)`, a small non-streaming
question to any replica (model info, readiness, metrics text, a liveness probe).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from cluster.serve.ingress.pieces import Piece, RequestContext
from cluster.serve.ingress.resume import NoReplica


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
    """`handle`: the attention replica deployment (cluster/serve/app.py AttentionReplica)."""

    def __init__(self, handle: Any, assign_timeout_s: float = 3.0) -> None:
        self.handle = handle
        self.streaming = handle.options(stream=True)
        self.shares_metrics = False
        self.assign_timeout_s = assign_timeout_s

    async def pieces(self, route: str, body: Any, ctx: RequestContext) -> AsyncIterator[Piece]:
        # One Serve streaming call per attempt: each item is a Piece (a batch of the request's
        # outputs), never one Ray message per token.
        response = self.streaming.generate.remote(route, body, ctx)
        try:
            # Serve's router holds a call until some replica takes it: with the only replica dead
            # that is until its replacement serves (10+ s). Bounded here; the admission bound
            # (429) is below max_ongoing_requests, so a busy replica refuses rather than queues.
            assigned = getattr(response, "_fetch_future_result_async", None)
            if assigned is not None:
                try:
                    async with asyncio.timeout(self.assign_timeout_s):
                        await assigned()
                except TimeoutError:
                    raise NoReplica(f"no attention replica took the request within {self.assign_timeout_s:g}s") from None
            async for piece in response:
                yield piece
        finally:
            response.cancel()  # a no-op once it finished; otherwise the replica aborts the request

    async def call(self, name: str) -> Any:
        return await getattr(self.handle, name).remote()
