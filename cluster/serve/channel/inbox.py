"""The ingress's end of the piece channel: one listener on the node's address, one mailbox per
request attempt.

A replica connects once (the first request this ingress sends it) and from then on every frame it
sends holds pieces of any number of this ingress's requests; the reader hands each to its mailbox
and wakes the request's task. A mailbox remembers the connection that carried its pieces: when that
connection ends (the replica died, or its process is going away), every mailbox it carried fails
with ChannelClosed at once, without waiting for Ray to report the actor's death.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from typing import Any

from cluster.serve.channel import wire
from cluster.serve.channel.wire import ChannelClosed, ChannelRefused

log = logging.getLogger(__name__)


class Mailbox:
    """The pieces of one request attempt, as they arrive; `take()` hands out all that wait."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.carrier: Any = None  # the connection its pieces came on (set by the first one)
        self._items: deque = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None

    def put(self, piece: Any, carrier: Any) -> None:
        self.carrier = carrier
        self._items.append(piece)
        self._wake()

    def fail(self, error: BaseException) -> None:
        """No more pieces will come: `take` raises `error` once what arrived before is taken."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._error is None:
            self._error = error
        self._wake()

    def fail_after(self, delay_s: float, error: BaseException) -> None:
        """Fail in `delay_s` unless failed (or closed) before."""
        if self._error is None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay_s, self.fail, error)

    async def take(self) -> list[Any]:
        """Every piece waiting (at least one), or the failure once none wait."""
        while not self._items:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Inbox:
    """`secret`: the cluster secret (bytes); `host`: the address replicas dial (the node's)."""

    def __init__(self, secret: bytes, host: str) -> None:
        self.secret = secret
        self.host = host
        self.address: tuple[str, int] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._starting: asyncio.Lock | None = None
        self._boxes: dict[str, Mailbox] = {}
        self._prefix = os.urandom(6).hex()  # stream ids unique across ingress restarts
        self._ids = itertools.count()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> tuple[str, int]:
        """Listen (once, on the running loop: the ingress replica's); the address to dial."""
        if self._server is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self._server is None:
                    server = await asyncio.start_server(self._serve, self.host, 0)
                    self.address = (self.host, server.sockets[0].getsockname()[1])
                    self._server = server
                    log.info("piece channel listening on %s:%d", *self.address)
        assert self.address is not None
        return self.address

    def open(self) -> Mailbox:
        box = Mailbox(f"{self._prefix}-{next(self._ids)}")
        self._boxes[box.stream_id] = box
        return box

    def close(self, box: Mailbox) -> None:
        """The attempt is over: later pieces for it (a cancelled request's tail) are dropped."""
        self._boxes.pop(box.stream_id, None)

    @property
    def connections(self) -> int:
        """Open replica connections (tests, logs)."""
        return len(self._writers)

    async def stop(self) -> None:
        """Stop listening and end every connection (their streams fail)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            name = await wire.accept(reader, writer, self.secret)
        except (ChannelRefused, ConnectionError) as exc:
            log.warning("piece channel: refused %s: %s", peer, exc)
            writer.close()
            return
        carrier = object()  # this connection, as the mailboxes remember it
        self._writers.add(writer)
        why = "closed by the replica"
        try:
            while (items := await wire.read_frame(reader)) is not None:
                boxes = self._boxes
                for stream_id, piece in items:
                    box = boxes.get(stream_id)
                    if box is not None:
                        box.put(piece, carrier)
        except Exception as exc:  # noqa: BLE001 - a broken connection or frame: its streams are lost
            why = f"{type(exc).__name__}: {exc}"
        finally:
            self._writers.discard(writer)
            writer.close()
            lost = ChannelClosed(f"the piece channel from replica {name} ended ({why})")
            for box in list(self._boxes.values()):
                if box.carrier is carrier:
                    box.fail(lost)
            log.info("piece channel from replica %s (%s) ended: %s", name, peer, why)
