"""A window of metric samples, and the figures policies read from it (percentiles, rates, load).

Attention replicas and expert workers each write one sample per metrics interval to the store.
Latency samples are raw observations (bounded per interval) so percentiles over the window are
true percentiles of the merged observations, not averages of per-replica percentiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class ReplicaSample:
    """One attention replica over one metrics interval ending at `ts`."""

    source: str  # replica id
    ts: float  # seconds since the epoch (store clock)
    queue: int = 0  # requests waiting for a slot
    running: int = 0  # sequences in the decode batch
    kv_use: float = 0.0  # fraction of KV blocks in use
    ttft_ms: tuple[float, ...] = ()  # time to first token of requests that started streaming
    itl_ms: tuple[float, ...] = ()  # inter-token latencies observed


@dataclass(frozen=True)
class WorkerSample:
    """One expert worker over one metrics interval of `interval_s` ending at `ts`."""

    source: str  # worker id
    ts: float
    interval_s: float
    tokens: int = 0  # token-rows computed (a token counts once per group it visited)
    busy_s: float = 0.0  # time spent computing within the interval
    step_ms: tuple[float, ...] = ()  # latency of expert calls
    group_tokens: dict[int, int] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float | None:
    """q in [0, 100]; linear interpolation between order statistics; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class MetricsWindow:
    """Samples with start < ts <= end."""

    start: float
    end: float
    replicas: tuple[ReplicaSample, ...] = ()
    workers: tuple[WorkerSample, ...] = ()

    @classmethod
    def of(cls, start: float, end: float, replicas: Iterable[ReplicaSample] = (),
           workers: Iterable[WorkerSample] = ()) -> "MetricsWindow":
        return cls(
            start, end,
            tuple(s for s in replicas if start < s.ts <= end),
            tuple(s for s in workers if start < s.ts <= end),
        )

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)

    @property
    def empty(self) -> bool:
        return not self.replicas and not self.workers

    # -- attention replicas ---------------------------------------------------------------------

    def _latest_per_replica(self) -> list[ReplicaSample]:
        latest: dict[str, ReplicaSample] = {}
        for s in self.replicas:
            if s.source not in latest or s.ts > latest[s.source].ts:
                latest[s.source] = s
        return list(latest.values())

    def queue(self) -> float:
        """Requests waiting now, summed over replicas (latest sample of each)."""
        return float(sum(s.queue for s in self._latest_per_replica()))

    def running(self) -> float:
        return float(sum(s.running for s in self._latest_per_replica()))

    def kv_use(self) -> float | None:
        latest = self._latest_per_replica()
        return max(s.kv_use for s in latest) if latest else None

    def ttft_p(self, q: float = 99) -> float | None:
        return percentile([x for s in self.replicas for x in s.ttft_ms], q)

    def itl_p(self, q: float = 99) -> float | None:
        return percentile([x for s in self.replicas for x in s.itl_ms], q)

    # -- expert workers -------------------------------------------------------------------------

    def worker_ids(self) -> list[str]:
        return sorted({s.source for s in self.workers})

    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.workers) / self.seconds

    def utilisation(self) -> dict[str, float]:
        """Busy fraction of each worker over the time its samples cover."""
        busy: dict[str, float] = {}
        covered: dict[str, float] = {}
        for s in self.workers:
            busy[s.source] = busy.get(s.source, 0.0) + s.busy_s
            covered[s.source] = covered.get(s.source, 0.0) + s.interval_s
        return {w: min(1.0, busy[w] / max(covered[w], 1e-9)) for w in busy}

    def mean_utilisation(self) -> float | None:
        u = self.utilisation()
        return sum(u.values()) / len(u) if u else None

    def group_tokens(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.workers:
            for g, n in s.group_tokens.items():
                out[int(g)] = out.get(int(g), 0) + int(n)
        return out

    def group_imbalance(self, n_groups: int | None = None) -> float | None:
        """(max_g T_g - min_g T_g) / mean_g T_g over groups; 0 for MoGE, > 0 for top-k checkpoints.

        Groups that saw no token count as 0 when `n_groups` is given.
        """
        per = self.group_tokens()
        if n_groups is not None:
            per = {g: per.get(g, 0) for g in range(n_groups)}
        if not per:
            return None
        total = sum(per.values())
        if total == 0:
            return 0.0
        mean = total / len(per)
        return (max(per.values()) - min(per.values())) / mean
