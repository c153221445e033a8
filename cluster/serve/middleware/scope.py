"""What the middlewares read off (or stamp on) an ASGI scope: the route path, one header, the arrival time."""

from __future__ import annotations

from starlette.types import Scope

ARRIVAL = "moge.arrival"  # scope key: when the request reached the ingress (metrics clock, seconds)


def route_path(scope: Scope) -> str:
    """The path as the routes see it: Serve mounts the app under its route prefix (root_path)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower-case bytes), decoded as HTTP does (latin-1)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def arrival_of(scope: Scope) -> float | None:
    """The arrival stamped by the outermost middleware; None outside the app (the front takes now)."""
    return scope.get(ARRIVAL)
