"""The piece channel's wire: a mutual proof of the cluster secret, then length-prefixed frames.

Opening: the ingress (listening) sends a fresh 32-byte nonce; the replica (dialling) answers with
its own nonce, HMAC-SHA256(secret, label | "replica" | ingress nonce) and a short name; the ingress
checks the tag before it reads anything else and answers HMAC-SHA256(secret, label | "ingress" |
replica nonce), which the replica checks in turn. Every read before the proof has a fixed size and a
deadline, so a peer without the secret costs 64 bytes and one short-lived task, and nonces are new
per connection (nothing to replay).

A frame: 4-byte big-endian length, then a pickle of [(stream id, Piece), ...]: every piece one
replica has for one ingress at that moment (one step's outputs of all its streams), so the hop
costs one frame per step, not one message per request and token. Pickle is safe here for the same
reason it is between Ray actors: only a holder of the cluster secret gets past the opening.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import pickle
import struct
from typing import Any

NONCE = 32
TAG = 32
MAX_NAME = 255
MAX_FRAME = 256 * 1024 * 1024  # a whole non-stream answer with logprobs fits many times over
_LABEL = b"moge-pieces/v1/"
_LEN = struct.Struct("!I")


class ChannelRefused(ConnectionError):
    """The peer did not prove it holds the cluster secret."""


class ChannelClosed(ConnectionError):
    """The connection that carried (or was to carry) a stream's pieces is gone: for the ingress, the
    stream's replica is lost (cluster/serve/ingress/resume.py resumes it elsewhere)."""


def _tag(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, _LABEL + role + nonce, hashlib.sha256).digest()


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                 timeout_s: float = 5.0) -> str:
    """The ingress's side of the opening; the replica's name, or ChannelRefused."""
    mine = os.urandom(NONCE)
    writer.write(mine)
    await writer.drain()
    try:
        async with asyncio.timeout(timeout_s):
            head = await reader.readexactly(NONCE + TAG + 1)
            theirs, tag, size = head[:NONCE], head[NONCE:NONCE + TAG], head[-1]
            if not hmac.compare_digest(tag, _tag(secret, b"replica", mine)):
                raise ChannelRefused("the replica did not prove the cluster secret")
            name = (await reader.readexactly(size)).decode(errors="replace")
    except (asyncio.IncompleteReadError, TimeoutError) as exc:
        raise ChannelRefused(f"incomplete opening: {type(exc).__name__}") from None
    writer.write(_tag(secret, b"ingress", theirs))
    await writer.drain()
    return name


async def dial(host: str, port: int, secret: bytes, name: str,
               timeout_s: float = 5.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The replica's side: a connection to an ingress whose proof has been checked."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            theirs = await reader.readexactly(NONCE)
            mine = os.urandom(NONCE)
            raw = name.encode()[:MAX_NAME]
            writer.write(mine + _tag(secret, b"replica", theirs) + bytes([len(raw)]) + raw)
            await writer.drain()
            tag = await reader.readexactly(TAG)
        except asyncio.IncompleteReadError:
            writer.close()
            raise ChannelRefused(f"the ingress at {host}:{port} ended the opening: it did not accept "
                                 "this replica's proof of the cluster secret") from None
        except BaseException:
            writer.close()
            raise
    if not hmac.compare_digest(tag, _tag(secret, b"ingress", mine)):
        writer.close()
        raise ChannelRefused(f"the ingress at {host}:{port} did not prove the cluster secret")
    return reader, writer


def frame(items: list[tuple[str, Any]]) -> bytes:
    payload = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> list[tuple[str, Any]] | None:
    """The next frame's items; None at a clean end of the connection."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the limit of {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(size))
