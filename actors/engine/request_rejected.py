"""The one error a caller can cause when submitting a request.

It subclasses ValueError so plain Python callers can catch it generically, while the HTTP layer
maps exactly this type to a 400 with its message as the OpenAI error body.
"""

from __future__ import annotations


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long, bad sampling values, duplicate id)."""
