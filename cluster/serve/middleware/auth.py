"""Optional Bearer API keys on every route but the probes /health and /ready; routes under a prefix
with keys of their own (/admin: the admin keys) are checked against those instead, here too, so an
unauthenticated client's body is never read (the request guard runs after this middleware).

An ASGI middleware rather than a FastAPI dependency so that it also guards routes nobody declared
(an unauthenticated client learns nothing, not even which paths exist) and answers before a request
body is read. Keys are compared in constant time, against every configured key, so timing reveals
neither a key's prefix nor which key matched.
"""

from __future__ import annotations

import hmac
from typing import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.serve.errors import AdminDisabled, APIError, AuthenticationFailed
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
    """`own_keys`: path prefix -> the keys its routes take instead of the API keys (the admin API
    uses server.admin_keys, and no admin key means 403 for everyone), so an OpenAI key neither opens
    nor is needed for them."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, own_keys: dict[str, ApiKeys] | None = None) -> None:
        self.app = app
        self.keys = keys
        self.own_keys = dict(own_keys or {})

    def _keys_for(self, path: str) -> tuple[ApiKeys | None, bool]:
        """(the keys that guard `path`, whether it has keys of its own)."""
        if path in OPEN_PATHS:
            return None, False
        for prefix, keys in self.own_keys.items():
            if path == prefix or path.startswith(prefix + "/"):
                return keys, True
        return self.keys, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys, own = (None, False) if scope["type"] != "http" else self._keys_for(route_path(scope))
        try:
            if own and not keys.enabled:
                raise AdminDisabled("The admin API is disabled: set server.admin_keys (--admin-key)")
            if keys is not None and keys.enabled:
                keys.check(header(scope, b"authorization"))
        except APIError as err:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

