"""What travels between the ingress and the server half (the attention replica's async-generator
methods): the request's context one way, pieces of the response the other.

A piece carries the bytes the client gets (SSE events, or the whole JSON body at the end) and the
engine outputs behind them (`progress`), which the ingress journals per choice. After a replica
dies, the ingress sends the same request again with `RequestContext.resume` holding that journal:
the new replica replays it into its response formatter (nothing re-sent) and resumes each unfinished
choice as an engine continuation (actors/engine/engine.py `add_request(generated=...)`), so the
client's stream goes on byte-compatibly: same id, same created, the next token.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Resume:
    """What the client already has: per choice, the engine outputs it was sent, in order."""

    outputs: dict[int, list[Any]] = field(default_factory=dict)  # choice index -> RequestOutputs
    opened: bool = False  # the stream's opening events (chat role deltas) went out already

    def tokens(self, index: int) -> list[int]:
        return [t for out in self.outputs.get(index, ()) for t in out.new_token_ids]

    def finished(self, index: int) -> bool:
        outs = self.outputs.get(index)
        return bool(outs) and bool(outs[-1].finished)


@dataclass
class RequestContext:
    """Fixed by the ingress when a request arrives and kept across replicas."""

    id_suffix: str = field(default_factory=lambda: f"{random.getrandbits(96):024x}")
    created: int = field(default_factory=lambda: int(time.time()))
    # the seed of a request that names none: a resumed sampled choice draws what it would have
    seed: int = field(default_factory=lambda: random.getrandbits(48))
    resume: Resume | None = None
    # wall-clock time the request reached the ingress: where its latencies start (the TTFT its
    # client sees). Wall clock because the ingress and the replica may be on different nodes;
    # each side converts to and from its own monotonic clock.
    arrival: float = field(default_factory=time.time)

    @classmethod
    def arriving(cls, arrival: float | None, clock: Callable[[], float]) -> "RequestContext":
        """A context for a request that arrived at `arrival` on `clock` (None: now)."""
        ctx = cls()
        if arrival is not None:
            ctx.arrival -= max(0.0, clock() - arrival)
        return ctx

    def local_arrival(self, clock: Callable[[], float]) -> float:
        """The arrival on `clock` (this process's monotonic clock)."""
        return clock() - max(0.0, time.time() - self.arrival)


@dataclass
class Piece:
    data: bytes = b""  # for the client: SSE events of a stream, or the whole JSON body (final)
    progress: list[tuple[int, Any]] = field(default_factory=list)  # (choice index, RequestOutput)
    status: int = 200  # an error answered before anything was sent: the only piece
    headers: dict[str, str] | None = None  # response headers, on the first piece
    stream: bool = False  # the response is an SSE stream (first piece)
    final: bool = False  # nothing follows
    error_status: int | None = None  # an in-band error event of a started stream (for the counters)


def merge_pieces(pieces: list[Piece]) -> Piece:
    """Consecutive pieces of one request as one (a consumer that fell behind the channel sends one
    write, not one per step): bytes and progress in order, the first's headers and stream flag, the
    last's status and end."""
    if len(pieces) == 1:
        return pieces[0]
    first, last = pieces[0], pieces[-1]
    headers: dict[str, str] = {}
    for piece in pieces:
        headers.update(piece.headers or {})
    return Piece(
        data=b"".join(piece.data for piece in pieces),
        progress=[item for piece in pieces for item in piece.progress],
        status=last.status,
        headers=headers or None,
        stream=first.stream,
        final=last.final,
        error_status=next((piece.error_status for piece in pieces if piece.error_status is not None), None),
    )


def json_piece(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Piece:
    """A whole JSON answer (a pydantic model or plain data) as the only piece."""
    data = body.model_dump(mode="json") if hasattr(body, "model_dump") else body
    return Piece(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(), status=status,
                 headers=headers, final=True)
