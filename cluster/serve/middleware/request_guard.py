"""Slow, leaving and abusive clients, answered in the ingress before they cost a replica anything
(ASGI middleware).

For every POST it (1) requires a JSON content type (415), (2) reads the whole body under a deadline
(408: a client that sends headers and then trickles or stalls its body holds a connection for at most
`body_read_timeout_s`) and a size limit (413, smaller for /admin), counting bodies that did not
arrive whole in their first message against a per-client and a total cap (429 past either: a body
that arrives whole never waits, so no number of slow clients delays a well-behaved one), (3) parses
it once with a bounded depth (400 naming the limit: cluster/serve/ingress/json_body.py) and checks
n/best_of (400, before any admission), then hands the parsed body to the route (scope[PARSED_BODY])
and replays the raw bytes to the app; and (4) bounds every request by `request_timeout_s` in total
(504 if nothing was answered yet; a started stream is ended).

A client that leaves while sending its body (http.disconnect, or Serve cancelling the ASGI receive)
is counted as a disconnect, never as an error. Generation admission (429 past a replica's bound of
sequences) is the replica's: cluster/serve/openai_server.py `OpenAIServer._admitted`, after
validation.
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
    is_disconnect,
)
from cluster.serve.ingress.json_body import check_choices, loads_bounded
from cluster.serve.middleware.scope import header, route_path

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})
ADMIN_PREFIX = "/admin"
PARSED_BODY = "moge.parsed_body"  # scope key: the body parsed once, for the route


@dataclass(frozen=True)
class GuardLimits:
    max_body_bytes: int = 1 << 20
    admin_max_body_bytes: int = 16 << 10
    body_read_timeout_s: float = 10.0
    request_timeout_s: float = 600.0
    max_in_flight: int = 96  # sequences a replica admits at once (batch + waiting queue)
    retry_after_s: int = 1
    max_partial_bodies: int = 512  # bodies still arriving, all clients
    max_partial_bodies_per_client: int = 128

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
            max_partial_bodies=server.max_partial_bodies,
            max_partial_bodies_per_client=server.max_partial_bodies_per_client,
        )


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: GuardLimits, max_n: int = 8, metrics=None,
                 takes_body: Callable[[Scope], bool] | None = None) -> None:
        """`takes_body(scope)`: whether a route answers this POST (`post_route_matcher`); a POST
        anywhere else goes to the app unread, which answers 405 (GET routes) or 404, not 415."""
        self.app = app
        self.limits = limits
        self.max_n = max_n
        self.metrics = metrics  # cluster.serve.metrics.ReplicaMetrics: disconnects
        self.takes_body = takes_body
        self.partial = 0  # bodies still arriving (this event loop only)
        self.partial_by_client: dict[str, int] = {}

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
        body = await self._read_body(scope, receive, limit)
        if body is None:
            if self.metrics is not None:
                self.metrics.count_disconnect("body")
            return  # the client left while sending: nobody to answer
        parsed = loads_bounded(body)
        if path in GENERATION_ROUTES:
            check_choices(parsed, self.max_n)
        scope[PARSED_BODY] = parsed
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None if the client left. Only a body that did not arrive whole in its
        first message is counted against the caps on partial bodies."""
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit)
        client = (scope.get("client") or ("?", 0))[0]
        body = bytearray()
        counted = False
        try:
            async with asyncio.timeout(self.limits.body_read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise BodyTooLarge(limit)
                    if not message.get("more_body", False):
                        return bytes(body)
                    whole = declared is not None and declared.isdigit() and len(body) >= int(declared)
                    if not counted and not whole:  # some of it is still on its way
                        self._hold(client)
                        counted = True
        except TimeoutError:
            raise RequestTimeout(
                f"The request body was not received within {self.limits.body_read_timeout_s:g}s") from None
        except Exception as exc:  # noqa: BLE001 - Serve cancels the receive of a client that left
            if is_disconnect(exc):
                return None
            raise
        finally:
            if counted:
                self._release(client)

    def _hold(self, client: str) -> None:
        mine = self.partial_by_client.get(client, 0)
        if self.partial >= self.limits.max_partial_bodies or mine >= self.limits.max_partial_bodies_per_client:
            raise Overloaded(
                f"Too many request bodies are still arriving ({self.partial} in all, {mine} from this client); "
                f"send the body at once or retry after {self.limits.retry_after_s}s", self.limits.retry_after_s)
        self.partial += 1
        self.partial_by_client[client] = mine + 1

    def _release(self, client: str) -> None:
        self.partial -= 1
        left = self.partial_by_client.get(client, 1) - 1
        if left:
            self.partial_by_client[client] = left
        else:
            self.partial_by_client.pop(client, None)


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
    except (ValueError, RecursionError):
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

