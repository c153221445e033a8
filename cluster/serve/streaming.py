"""Streaming helpers shared by the generation routes: several engine streams merged into batches
(what waits when the consumer comes back folds into one output per choice), and a streaming
response that closes its body (aborting the engine requests) when the client leaves."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from actors.engine.output.request_output import coalesce


async def merge_batches(gens: dict[int, AsyncIterator[Any]] | list[AsyncIterator[Any]],
                         interval_s: float = 0.0) -> AsyncIterator[list[tuple[int, Any]]]:
    """Interleave several engine streams as batches of (index, output), in arrival order: each
    batch is what had arrived when the consumer came back for more, and with `interval_s` > 0 what
    arrives until `interval_s` after the previous batch (server.stream_interval_ms; the first
    batch and a stream's end are never held). A batch holds one output per index (what waited for
    a slow consumer folds into one: one chunk per choice, not one per token), and the ingress hop
    costs one message per batch rather than one per token.

    Closing the merged stream (client gone, error) cancels every pump task; cancellation raises
    inside each engine generator, whose cleanup aborts its request.
    """
    items = gens.items() if isinstance(gens, dict) else enumerate(gens)
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

    tasks = [asyncio.create_task(pump(i, g)) for i, g in items]
    loop = asyncio.get_running_loop()
    last: float | None = None  # when the previous batch went out
    try:
        remaining = len(tasks)
        while remaining:
            batch: list[tuple[int, Any]] = []
            i, item = await queue.get()
            hold_until = None if last is None or interval_s <= 0 else last + interval_s
            while True:
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    if batch:
                        yield _folded(batch)
                    raise item
                else:
                    batch.append((i, item))
                if queue.empty():
                    wait = 0.0 if hold_until is None or not remaining else hold_until - loop.time()
                    if wait <= 0 or (batch and batch[-1][1].finished):
                        break
                    try:
                        i, item = await asyncio.wait_for(queue.get(), wait)
                    except TimeoutError:
                        break
                    continue
                i, item = queue.get_nowait()
            if batch:
                last = loop.time()
                yield _folded(batch)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _folded(batch: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """One output per choice, in the order the choices first appear."""
    outputs: dict[int, list[Any]] = {}
    for i, out in batch:
        outputs.setdefault(i, []).append(out)
    if len(outputs) == len(batch):
        return batch
    return [(i, coalesce(outs)) for i, outs in outputs.items()]


async def _merge(gens: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """`merge_batches`, one (index, output) at a time."""
    batches = merge_batches(gens)
    try:
        async for batch in batches:
            for item in batch:
                yield item
    finally:
        await batches.aclose()


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
