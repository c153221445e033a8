"""How long the controller waits for a worker before it suspects a hang.

A stopped (SIGSTOP, wedged) worker does not fail its calls, it just never answers, so only a
deadline finds it. A fixed 5 s per call, twice (stats, then a ping), cost ~15 s; instead the
deadline follows how fast workers really answer the controller: `factor` x the slowest of the last
`samples` answers, within [floor_s, ceiling_s]. The floor keeps a CPU-starved but healthy worker
(2-core CI, a loaded node) from being taken for hung; the ceiling is the old fixed timeout.
"""

from __future__ import annotations

from collections import deque


class HangDeadline:
    def __init__(self, factor: float = 10.0, floor_s: float = 2.5, ceiling_s: float = 5.0, samples: int = 64) -> None:
        self.factor, self.floor_s, self.ceiling_s = factor, floor_s, ceiling_s
        self._recent: deque[float] = deque(maxlen=samples)

    def record(self, seconds: float) -> None:
        """One answer's latency (stats or ping, from sending to the reply)."""
        self._recent.append(max(0.0, float(seconds)))

    def seconds(self) -> float:
        if not self._recent:
            return self.ceiling_s  # nothing measured yet: the patient old timeout
        return min(self.ceiling_s, max(self.floor_s, self.factor * max(self._recent)))
