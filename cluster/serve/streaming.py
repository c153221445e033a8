"""Streaming helpers shared by the generation routes: several engine streams merged into one (what
waits when the consumer comes back folds into one output per choice), and a streaming response that
closes its body (aborting the engine requests) when the client leaves."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from actors.engine.output.request_output import coalesce


async def _merge(gens: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several engine streams as (index, output), in arrival order; what is already
    waiting when the consumer comes back folds into one output per index (a slow client gets one
    chunk per choice, not one per token).

    Closing the merged stream (client gone, error) cancels every pump task; cancellation raises
    inside each engine generator, whose cleanup aborts its request.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[Any]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            queue.put_nowait((i, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            queue.put_nowait((i, done))
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            waiting = [await queue.get()]
            while not queue.empty():
                waiting.append(queue.get_nowait())
            outputs: dict[int, list[Any]] = {}
            error = None
            for i, item in waiting:
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    error = item
                    break
                else:
                    outputs.setdefault(i, []).append(item)
            for i, outs in outputs.items():
                yield i, coalesce(outs)
            if error is not None:
                raise error
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClosingStreamingResponse(StreamingResponse):
    """Starlette stops iterating a body when the client disconnects but never closes it; closing
    here runs the generator's cleanup (engine abort) now instead of at garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
