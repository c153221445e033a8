"""Past responses of one replica, for GET /v1/responses/{id} and previous_response_id.

In memory, bounded twice: at most `max_items` responses and `max_bytes` of them (their JSON, plus
the conversation each one continues), the least recently used dropped first. A replica restart, or
a request that lands on another replica, does not find them: previous_response_id then gets a 404
that says so (route a conversation to one replica, or resend the whole input).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cluster.serve.responses.conversation import stored_size
from cluster.serve.responses.protocol import ResponseObject


@dataclass
class StoredResponse:
    response: ResponseObject
    history: list[dict[str, Any]]  # the chat messages this turn continued, then its own input and output
    size: int


class ResponseStore:
    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, response: ResponseObject, history: list[dict[str, Any]]) -> bool:
        """Keep it (dropping the oldest to make room); False if it alone exceeds the bounds."""
        size = stored_size(response.model_dump(mode="json")) + stored_size(history)
        if self.max_items == 0 or size > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(response.id, None)
            if old is not None:
                self._bytes -= old.size
            self._items[response.id] = StoredResponse(response, history, size)
            self._bytes += size
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            item = self._items.get(response_id)
            if item is not None:
                self._items.move_to_end(response_id)
            return item

    def delete(self, response_id: str) -> bool:
        with self._lock:
            item = self._items.pop(response_id, None)
            if item is not None:
                self._bytes -= item.size
            return item is not None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes
