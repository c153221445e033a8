"""Slow and abusive clients, answered before they cost the replica anything (ASGI middleware).

For every POST it (1) requires a JSON content type (415), (2) reads the whole body under a deadline
(408: a client that sends headers and then trickles or stalls its body holds a connection for at most
`body_read_timeout_s`) and a size limit (413, smaller for /admin), then replays the buffered body to
the app; (3) for the generation routes, admits the request only while its sequences fit under
`max_in_flight` sequences running on this replica (429 with Retry-After: a bounded waiting queue
instead of unbounded TTFT); a request counts as max(n, best_of) sequences, as it costs the engine;
and (4) bounds every request by `request_timeout_s` in total (504 if nothing was
answered yet; a started stream is ended).

Admission counts requests whose body has arrived, so clients still sending their body never take a
generation slot, and /health, /ready and /metrics never wait for one. Ray Serve's own per-replica
limit (max_ongoing_requests, cluster/serve/app.py) is sized above `max_in_flight` so that these
cheap routes and slow bodies always find a Serve slot; otherwise Serve would queue them in the proxy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.serve.errors import (
    APIError,
    BodyTooLarge,
    DeadlineExceeded,
    Overloaded,
    RequestTimeout,
    UnsupportedMediaType,
)
from cluster.serve.middleware.scope import header, route_path

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})
ADMIN_PREFIX = "/admin"


@dataclass(frozen=True)
class GuardLimits:
    max_body_bytes: int = 1 << 20
    admin_max_body_bytes: int = 16 << 10
    body_read_timeout_s: float = 10.0
    request_timeout_s: float = 600.0
    max_in_flight: int = 96  # sequences admitted at once (batch + waiting queue)
    retry_after_s: int = 1

    @classmethod
    def from_settings(cls, server, max_num_seqs: int) -> "GuardLimits":
        """From cluster.config.ServerSection and the engine's batch size."""
        return cls(
            max_body_bytes=server.max_body_bytes,
            admin_max_body_bytes=server.admin_max_body_bytes,
            body_read_timeout_s=server.body_read_timeout_s,
            request_timeout_s=server.request_timeout_s,
            max_in_flight=max_num_seqs + server.max_waiting_requests,
            retry_after_s=server.retry_after_s,
        )


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: GuardLimits, takes_body: Callable[[Scope], bool] | None = None) -> None:
        """`takes_body(scope)`: whether a route answers this POST (`post_route_matcher`); a POST
        anywhere else goes to the app unread, which answers 405 (GET routes) or 404, not 415."""
        self.app = app
        self.limits = limits
        self.takes_body = takes_body
        self.in_flight = 0  # sequences of admitted, unfinished requests (this event loop only)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                await self._guarded(scope, receive, tracking_send)
        except TimeoutError:
            if not started:
                await DeadlineExceeded(
                    f"The request did not finish within {self.limits.request_timeout_s:g}s").response()(scope, receive, send)
        except APIError as err:
            if not started:
                await err.response()(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        if scope.get("method") != "POST" or (self.takes_body is not None and not self.takes_body(scope)):
            await self.app(scope, receive, send)
            return
        if not _is_json(header(scope, b"content-type")):
            raise UnsupportedMediaType("The request body must be JSON: send 'Content-Type: application/json'")
        is_admin = path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")
        limit = self.limits.admin_max_body_bytes if is_admin else self.limits.max_body_bytes
        body, disconnected = await self._read_body(scope, receive, limit)
        if disconnected:
            return  # the client left while sending: nobody to answer
        if path in GENERATION_ROUTES:
            # a request larger than the whole bound waits for an empty replica instead of never fitting
            seqs = min(sequences_of(body), self.limits.max_in_flight)
            if self.in_flight + seqs > self.limits.max_in_flight:
                raise Overloaded(
                    f"This replica is at its limit of {self.limits.max_in_flight} sequences in flight; "
                    f"retry after {self.limits.retry_after_s}s", self.limits.retry_after_s)
            self.in_flight += seqs
            try:
                await self.app(scope, _replay(body, receive), send)
            finally:
                self.in_flight -= seqs
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> tuple[bytes, bool]:
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return b"", True
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise BodyTooLarge(limit)
                    if not message.get("more_body", False):
                        return bytes(body), False
        except TimeoutError:
            raise RequestTimeout(
                f"The request body was not received within {self.limits.body_read_timeout_s:g}s") from None


def post_route_matcher(router) -> Callable[[Scope], bool]:
    """scope -> whether one of the router's routes (included routers too) fully matches it, method
    included: Starlette's own matching, so route prefixes and path parameters count as they route."""
    from starlette.routing import Match

    return lambda scope: any(route.matches(scope)[0] == Match.FULL for route in router.routes)


def sequences_of(body: bytes) -> int:
    """The sequences a generation request will run: max(n, best_of). 1 for anything the app will
    refuse anyway (not JSON, not an object, not positive integers): it answers those with a 400."""
    try:
        req = json.loads(body)
    except ValueError:
        return 1
    if not isinstance(req, dict):
        return 1
    counts = [v for v in (req.get("n"), req.get("best_of")) if type(v) is int and v >= 1]
    return max(counts, default=1)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then defers to the client (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))

