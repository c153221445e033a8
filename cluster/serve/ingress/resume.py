"""Streams that survive their replica: the ingress journals what each request has sent and, when
the replica generating it dies, sends it again to a live replica as a continuation.

`answer` runs one request against a backend (cluster/serve/ingress/backend.py) and yields its pieces.
A replica lost mid-request (its actor died: `REPLICA_LOST`) is retried with
`RequestContext.resume` = the journal so far, within `window_s` of the loss; the new replica replays
the journal into its formatter and resumes each unfinished choice after its last sent token
(cluster/serve/openai_server.py), so the client sees a pause, not a failure. Past the window (no
live replica answers: a single replica being replaced) the request ends with `ReplicaUnavailable`,
which the ingress answers as a 503 with Retry-After, or in band inside a started stream.

`ReplicaWatch` is the ingress's view of whether any replica serves: a failed resume or a failed
probe marks the deployment unavailable (new requests get 503 at once instead of queueing in Serve's
router for a replacement that takes 10+ s), and a probe that answers marks it serving again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

from cluster.serve.errors import RetryLater
from cluster.serve.ingress.pieces import Piece, RequestContext, Resume

log = logging.getLogger(__name__)


class ReplicaLost(RuntimeError):
    """The replica serving a request went away before its last piece."""


class NoReplica(ReplicaLost):
    """No replica took the request in time (none is alive, or all are being replaced)."""


class ReplicaUnavailable(RetryLater):
    status = 503
    type = "service_unavailable"
    code = "replica_unavailable"


def is_replica_lost(exc: BaseException) -> bool:
    """A replica's death as Ray reports it to a caller (the actor died or is unreachable), or as the
    piece channel does (its connection ended; raised in the replica, it comes wrapped by Ray)."""
    from cluster.serve.channel.wire import ChannelClosed

    if isinstance(exc, (ReplicaLost, ChannelClosed)) or isinstance(getattr(exc, "cause", None), ChannelClosed):
        return True
    try:
        from ray.exceptions import RayActorError, WorkerCrashedError
    except ImportError:  # pragma: no cover - Ray is a dependency
        return False
    return isinstance(exc, (RayActorError, WorkerCrashedError))


def journal(resume: Resume, piece: Piece) -> None:
    for index, out in piece.progress:
        resume.outputs.setdefault(index, []).append(out)
    if piece.stream and piece.data:
        resume.opened = True


async def answer(
    pieces: Callable[[RequestContext], AsyncIterator[Piece]], ctx: RequestContext, *, window_s: float,
    retry_after_s: int, on_resume: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic,
    backoff_s: float = 0.05,
) -> AsyncIterator[Piece]:
    """The pieces of one request; `pieces(ctx)` starts one attempt on some replica."""
    resume = Resume()
    lost_at: float | None = None
    while True:
        attempt = pieces(ctx)
        try:
            while True:
                if lost_at is None:
                    piece = await anext(attempt, None)
                else:  # a resume must reach a live replica within the window
                    left = window_s - (clock() - lost_at)
                    if left <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(left):
                        piece = await anext(attempt, None)
                    lost_at = None
                if piece is None:
                    raise ReplicaLost("the replica's stream ended before its last piece")
                journal(resume, piece)
                yield piece
                if piece.final:
                    return
        except TimeoutError:
            raise ReplicaUnavailable(f"no attention replica answered within {window_s:g}s; retry after "
                                     f"{retry_after_s}s", retry_after_s) from None
        except Exception as exc:  # noqa: BLE001 - only a lost replica is retried
            if not is_replica_lost(exc):
                raise
            if isinstance(exc, NoReplica) and lost_at is None and not resume.outputs and not resume.opened:
                raise ReplicaUnavailable(f"{exc}; retry after {retry_after_s}s", retry_after_s) from None
            if lost_at is None:
                lost_at = clock()
                log.warning("request %s: its replica was lost (%s); resuming on another", ctx.id_suffix,
                            type(exc).__name__)
                on_resume()
            elif clock() - lost_at > window_s:
                raise ReplicaUnavailable(f"no attention replica answered within {window_s:g}s; retry after "
                                         f"{retry_after_s}s", retry_after_s) from None
            ctx.resume = resume
            await asyncio.sleep(backoff_s)  # Serve's router drops the dead replica meanwhile
        finally:
            aclose = getattr(attempt, "aclose", None)
            if aclose is not None:
                await aclose()


class ReplicaWatch:
    """Whether any attention replica serves, as the ingress last saw it (probes + failures)."""

    def __init__(self, probe: Callable[[], Any], period_s: float = 1.0, timeout_s: float = 2.0,
                 failures_to_lose: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self.period_s, self.timeout_s = period_s, timeout_s
        # a slow probe on a loaded machine is not a dead replica: only this many in a row are
        self.failures_to_lose = failures_to_lose
        self._failures = 0
        self.serving = True
        self._clock = clock
        self._task: asyncio.Task | None = None

    def lost(self) -> None:
        if self.serving:
            log.warning("no attention replica serves: answering 503 until one does")
        self.serving = False

    async def check(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._probe()
        except Exception:  # noqa: BLE001 - dead, unreachable or queued behind a replacement
            self._failures += 1
            if self._failures >= self.failures_to_lose:
                self.lost()
            return False
        self._failures = 0
        if not self.serving:
            log.info("an attention replica serves again")
        self.serving = True
        return True

    def start(self) -> None:
        """Probe every period_s on the running loop (the ingress replica's)."""
        if self._task is None and self.period_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.period_s)
