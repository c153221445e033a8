"""Attention replica <-> Redis metrics: one ReplicaSample per interval, from a background thread.

Latency observations are tapped from the replica's Prometheus histograms (the tap forwards every
observation unchanged: TTFT from the request's arrival, cluster/serve/metrics/request_timer.py) into a
bounded reservoir, so the controller can compute true percentiles over a window. The same round
trip reads the controller's operation counters back, which the replica's /metrics shows
(`cluster_state`). If Redis is down the sample is dropped; serving never waits on it.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any, Callable

import redis

from cluster.elastic.metrics_window import ReplicaSample
from cluster.elastic.store import ElasticStore

log = logging.getLogger(__name__)


class SampleTap:
    """Stands in for a prometheus Histogram: observe() feeds both the histogram and a reservoir
    of at most `cap` values per drain (reservoir sampling keeps it unbiased under heavy load)."""

    def __init__(self, histogram: Any, cap: int = 256, scale: float = 1000.0, seed: int = 0) -> None:
        self.histogram = histogram
        self.cap = cap
        self.scale = scale  # seconds -> milliseconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._values: list[float] = []
        self._seen = 0

    def observe(self, value: float) -> None:
        self.histogram.observe(value)
        v = value * self.scale
        with self._lock:
            self._seen += 1
            if len(self._values) < self.cap:
                self._values.append(v)
            else:
                j = self._rng.randrange(self._seen)
                if j < self.cap:
                    self._values[j] = v

    def drain(self) -> tuple[float, ...]:
        with self._lock:
            out, self._values, self._seen = tuple(self._values), [], 0
        return out

    def __getattr__(self, name: str) -> Any:  # labels(), collect(), ... go to the histogram
        return getattr(self.histogram, name)


class ReplicaReporter:
    def __init__(self, store: ElasticStore, replica_id: str, engine_stats: Callable[[], Any],
                 ttft: SampleTap | None = None, itl: SampleTap | None = None, interval_s: float = 1.0) -> None:
        self.store = store
        self.replica_id = replica_id
        self.engine_stats = engine_stats
        self.ttft = ttft
        self.itl = itl
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-reporter", daemon=True)
        self._operations: dict[tuple[str, str], int] = {}  # the controller's counters, as last read

    @classmethod
    def tapping(cls, store: ElasticStore, replica_id: str, metrics: Any, interval_s: float = 1.0) -> "ReplicaReporter":
        """Wrap a ReplicaMetrics' ttft / itl histograms with taps and report its engine stats."""
        metrics.ttft = SampleTap(metrics.ttft)
        metrics.itl = SampleTap(metrics.itl)
        return cls(store, replica_id, metrics._engine_stats, metrics.ttft, metrics.itl, interval_s)

    def cluster_state(self) -> dict:
        """What the last round trip read of the controller: {"operations": {(kind, outcome): n}}."""
        return {"operations": dict(self._operations)}

    def start(self) -> "ReplicaReporter":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def sample(self) -> ReplicaSample:
        stats = self.engine_stats() if self.engine_stats is not None else None
        get = (lambda k: (stats.get(k, 0) if isinstance(stats, dict) else getattr(stats, k, 0)) or 0)
        return ReplicaSample(
            self.replica_id, self.store.clock(),
            queue=int(get("waiting")), running=int(get("running")), kv_use=float(get("kv_usage")),
            ttft_ms=self.ttft.drain() if self.ttft else (), itl_ms=self.itl.drain() if self.itl else (),
        )

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add_replica_sample(self.sample())
                self._operations = self.store.operation_counts()
                failures = 0
            except (redis.RedisError, OSError) as e:
                failures += 1
                if failures == 1:
                    log.warning("metrics not reported (Redis unavailable: %s)", e)
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                log.exception("metrics sample failed")
