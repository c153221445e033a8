"""Optional Bearer API keys on every route but the probes /health and /ready (and routes that check their own keys).

An ASGI middleware rather than a FastAPI dependency so that it also guards routes nobody declared
(an unauthenticated client learns nothing, not even which paths exist) and answers before a request
body is read. Keys are compared in constant time, against every configured key, so timing reveals
neither a key's prefix nor which key matched.
"""

from __future__ import annotations

import hmac
from typing import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.serve.errors import AuthenticationFailed
from cluster.serve.middleware.scope import header, route_path

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes carry no keys


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationFailed unless `authorization` is `Bearer <one of the keys>`."""
        if not self.enabled:
            return
        if not authorization:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'")
        presented = token.strip().encode()
        matched = False
        for key in self._keys:  # no early exit: every key costs the same time
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise AuthenticationFailed("Incorrect API key provided")


class ApiKeyMiddleware:
    """`own_keys_prefixes`: path prefixes whose routes authenticate with keys of their own (the
    admin API uses server.admin_keys), so an OpenAI key neither opens nor is needed for them."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, own_keys_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = keys
        self.own_keys_prefixes = own_keys_prefixes

    def _exempt(self, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        return any(path == p or path.startswith(p + "/") for p in self.own_keys_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or self._exempt(route_path(scope)):
            await self.app(scope, receive, send)
            return
        try:
            self.keys.check(header(scope, b"authorization"))
        except AuthenticationFailed as err:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

