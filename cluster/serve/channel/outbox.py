"""The attention replica's end of the piece channel: one connection per ingress, dialled on the
first request from it, and a flusher that sends what every request has for that ingress as one
frame.

After one engine step every running stream's task produces its piece within a few turns of the
event loop (each stream's chain of queues and generators is the same length). `send` queues the
piece and waits until the frame holding it is written; the flusher waits until the queue has
stopped growing for two turns (at most SETTLE_TURNS), so one step's pieces leave in one frame
however many streams there are, and writes it. A sender waiting for its frame is the backpressure:
an ingress that cannot keep up slows its own streams, not the engine (a stream's next outputs fold
into one piece meanwhile, cluster/serve/openai_server.py `_merge_batches`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from cluster.serve.channel import wire
from cluster.serve.channel.wire import ChannelClosed

log = logging.getLogger(__name__)

SETTLE_TURNS = 16


class Outbox:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str) -> None:
        self._writer = writer
        self.label = label
        self.closed: BaseException | None = None
        self._pending: list[tuple[str, Any]] = []
        self._sent: asyncio.Future | None = None  # resolves when the pending pieces are written
        self._flusher: asyncio.Task | None = None
        self.frames = 0  # frames written (tests, the bench)
        self._watch = asyncio.get_running_loop().create_task(self._watch_close(reader))

    async def send(self, stream_id: str, piece: Any) -> None:
        """Queue one piece and wait until it is on the wire; ChannelClosed if it never will be."""
        if self.closed is not None:
            raise ChannelClosed(f"the piece channel to {self.label} is closed: {self.closed}")
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
        sent = self._sent
        self._pending.append((stream_id, piece))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await asyncio.shield(sent)

    async def _flush(self) -> None:
        try:
            while self._pending and self.closed is None:
                seen, quiet = len(self._pending), 0
                for _ in range(SETTLE_TURNS):
                    await asyncio.sleep(0)
                    if len(self._pending) == seen:
                        quiet += 1
                        if quiet == 2:
                            break
                    else:
                        seen, quiet = len(self._pending), 0
                items, sent = self._pending, self._sent
                self._pending, self._sent = [], None
                try:
                    self._writer.write(wire.frame(items))
                    await self._writer.drain()
                except Exception as exc:  # noqa: BLE001 - the ingress is gone: every sender hears it
                    self._close(exc)
                    _fail(sent, ChannelClosed(f"the piece channel to {self.label} broke: {exc}"))
                    return
                self.frames += 1
                if sent is not None and not sent.done():
                    sent.set_result(None)
        finally:
            self._flusher = None

    async def _watch_close(self, reader: asyncio.StreamReader) -> None:
        """The ingress never writes after the opening: anything else is its end (or garbage)."""
        try:
            await reader.read(1)
        except Exception:  # noqa: BLE001 - reset: the same end
            pass
        self._close(ConnectionError("closed by the ingress"))

    def _close(self, why: BaseException) -> None:
        if self.closed is None:
            self.closed = why
            log.info("piece channel to %s closed: %s", self.label, why)
        self._writer.close()
        sent, self._sent = self._sent, None
        _fail(sent, ChannelClosed(f"the piece channel to {self.label} closed: {why}"))

    def close(self) -> None:
        self._watch.cancel()
        self._close(ConnectionError("closed by the replica"))


async def send_all(outbox: Outbox, stream_id: str, pieces: AsyncIterator[Any]) -> int:
    """Every piece of one request attempt, in order; their count once the last is on the wire. A
    failure or cancel closes `pieces` (the server half then aborts its engine requests)."""
    sent = 0
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            await outbox.send(stream_id, piece)
            sent += 1
    return sent


def _fail(sent: asyncio.Future | None, error: BaseException) -> None:
    if sent is not None and not sent.done():
        sent.set_exception(error)
        sent.exception()  # retrieved: senders cancelled meanwhile leave no "never retrieved" warning


class Outboxes:
    """This replica's connections, by ingress address; `secret` proves the replica, `name` names it."""

    def __init__(self, secret: bytes, name: str) -> None:
        self.secret = secret
        self.name = name
        self._boxes: dict[tuple[str, int], Outbox] = {}
        self._dialling: dict[tuple[str, int], asyncio.Lock] = {}

    async def to(self, address: tuple[str, int]) -> Outbox:
        address = (str(address[0]), int(address[1]))
        box = self._boxes.get(address)
        if box is not None and box.closed is None:
            return box
        lock = self._dialling.setdefault(address, asyncio.Lock())
        async with lock:  # concurrent first requests from one ingress share one connection
            box = self._boxes.get(address)
            if box is None or box.closed is not None:
                try:
                    reader, writer = await wire.dial(*address, self.secret, self.name)
                except (OSError, TimeoutError) as exc:  # refused, unreachable, or no proof
                    log.error("piece channel: cannot reach the ingress at %s:%d: %s", *address, exc)
                    raise ChannelClosed(f"cannot reach the ingress at {address[0]}:{address[1]}: {exc}") from None
                box = self._boxes[address] = Outbox(reader, writer, f"{address[0]}:{address[1]}")
        return box

    def close(self) -> None:
        for box in self._boxes.values():
            box.close()
        self._boxes.clear()
