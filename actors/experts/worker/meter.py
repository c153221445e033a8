"""Per-worker counters behind one lock (compute runs on several carrier threads): calls, tokens,
busy time, per-group tokens, and tokens/s and busy fraction over a sliding window.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

STATS_WINDOW_S = 10.0  # tokens/s and busy fraction are reported over this sliding window


class Meter:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.calls = 0
        self.tokens = 0
        self.busy_s = 0.0
        self.group_tokens: dict[int, int] = {}
        self.window: deque[tuple[float, int, float]] = deque()  # (end time, tokens, seconds)
        self.last_latency_s = 0.0

    def record(self, groups: list[int], tokens_per_group: list[int], seconds: float) -> None:
        now = self.clock()
        total = sum(tokens_per_group)
        with self.lock:
            self.calls += 1
            self.tokens += total
            self.busy_s += seconds
            self.last_latency_s = seconds
            for g, n in zip(groups, tokens_per_group):
                self.group_tokens[g] = self.group_tokens.get(g, 0) + n
            self.window.append((now, total, seconds))
            while self.window and self.window[0][0] < now - STATS_WINDOW_S:
                self.window.popleft()

    def snapshot(self) -> dict:
        now = self.clock()
        with self.lock:
            recent = [w for w in self.window if w[0] >= now - STATS_WINDOW_S]
            span = min(STATS_WINDOW_S, max(now - recent[0][0] + recent[0][2], 1e-9)) if recent else STATS_WINDOW_S
            return {
                "calls": self.calls,
                "tokens": self.tokens,
                "busy_s": self.busy_s,
                "tokens_per_s": sum(w[1] for w in recent) / span if recent else 0.0,
                "busy_fraction": min(1.0, sum(w[2] for w in recent) / span) if recent else 0.0,
                "step_latency_s": self.last_latency_s,
                "group_tokens": dict(self.group_tokens),
            }
