"""Which expert workers this replica counts as down, and how long a call may take before its
worker counts as hung (DESIGN invariant 4: a hung worker costs one deadline, not a transport timeout).

  deadline   fixed when a call is sent: sent + deadline_s(), where deadline_s is `factor` x the
             slowest of the last LATENCY_SAMPLES replies, within [min_deadline_s, wait_timeout_s]
             (wait_timeout_s until MIN_SAMPLES replies were seen: cold start, warm-up).
  latencies  recorded when a reply arrives (the carrier's thread, at arrival), never when the step
             thread gets round to collecting it: a step thread held up elsewhere (the other
             micro-batch, a failover) does not stretch the next call's deadline.
  down       a worker that missed a deadline or failed a call; nothing waits on it any more until
             it is replaced (revive) or leaves the placement. `version` counts changes, so a route
             built from this set knows when it is stale.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

LATENCY_SAMPLES = 64
MIN_SAMPLES = 8


class Liveness:
    def __init__(self, min_deadline_s: float = 1.5, deadline_factor: float = 10.0, wait_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_deadline_s, self.deadline_factor, self.wait_timeout_s = min_deadline_s, deadline_factor, wait_timeout_s
        self.clock = clock
        self.version = 0
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._down: set[str] = set()

    def record(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)

    def deadline_s(self) -> float:
        with self._lock:
            recent = list(self._latencies)
        if len(recent) < MIN_SAMPLES:
            return self.wait_timeout_s
        return min(self.wait_timeout_s, max(self.min_deadline_s, self.deadline_factor * max(recent)))

    def deadline(self) -> float:
        """The absolute deadline of a call sent now."""
        return self.clock() + self.deadline_s()

    def left(self, deadline: float) -> float:
        return max(0.0, deadline - self.clock())

    def mark_down(self, worker_id: str) -> bool:
        with self._lock:
            if worker_id in self._down:
                return False
            self._down.add(worker_id)
            self.version += 1
            return True

    def revive(self, worker_id: str) -> None:
        with self._lock:
            if worker_id in self._down:
                self._down.discard(worker_id)
                self.version += 1

    def is_down(self, worker_id: str) -> bool:
        with self._lock:
            return worker_id in self._down

    def down(self) -> set[str]:
        with self._lock:
            return set(self._down)

    def keep_only(self, workers) -> None:
        """A new placement: forget workers it no longer names."""
        with self._lock:
            kept = self._down & set(workers)
            if kept != self._down:
                self._down = kept
                self.version += 1
