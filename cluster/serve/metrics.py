"""Prometheus metrics of one attention replica, rendered at its /metrics route.

Each replica owns a private CollectorRegistry: Ray's own metrics and any other replica living in
the same process never mix into it, and tests can build as many as they like. Engine gauges (queue,
running sequences, KV use) are read from the engine's stats at scrape time, so the hot loop does no
metrics work for them; only per-token latencies are observed as tokens stream.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# seconds; TTFT on a CPU demo reaches seconds, on a GPU tens of milliseconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ReplicaMetrics:
    """`part`: which families this registry holds. The ingress holds "http" (what HTTP answered), each
    attention replica "engine" (tokens, latencies, engine gauges), and /metrics of the ingress renders
    both, disjoint; "all" is one process doing both (unit tests)."""

    def __init__(self, model: str, engine_stats: Callable[[], Any] | None = None, part: str = "all") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine_stats = engine_stats
        r = self.registry
        http = r if part in ("all", "http") else CollectorRegistry()
        r = r if part in ("all", "engine") else CollectorRegistry()  # families of the other part: unrendered
        self.requests = Counter(
            "moge_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=http
        )
        self.stream_errors = Counter(
            "moge_stream_errors", "errors reported inside an already started (200) stream, by the status "
            "they would have had", ["status"], registry=http)
        self.disconnects = Counter(
            "moge_client_disconnects", "clients that left before their answer was complete, by phase (body: "
            "while sending it; response: while it was being sent) - never counted as a status", ["phase"],
            registry=http)
        self.resumes = Counter(
            "moge_stream_resumes", "requests resumed on another attention replica after theirs was lost",
            registry=http)
        self.prompt_tokens = Counter("moge_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(
            "moge_completion_tokens", "tokens generated for finished requests", registry=r
        )
        self.ttft = Histogram(
            "moge_time_to_first_token_seconds", "request arrival to first generated token", buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "moge_inter_token_latency_seconds", "time between consecutive generated tokens", buckets=ITL_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("moge_num_requests_waiting", "sequences queued, not yet scheduled", registry=r)
        self.running = Gauge("moge_num_requests_running", "sequences in the running batch", registry=r)
        self.kv_usage = Gauge("moge_kv_cache_usage_ratio", "fraction of KV cache blocks in use", registry=r)
        self.prefix_hit = Gauge(
            "moge_prefix_cache_hit_ratio", "share of admitted prompt tokens found in the prefix cache, since start",
            registry=r,
        )
        info = Gauge("moge_model_info", "the model this replica serves", ["model"], registry=r)
        info.labels(model=model).set(1)

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def count_stream_error(self, status: int) -> None:
        self.stream_errors.labels(status=str(status)).inc()

    def count_disconnect(self, phase: str) -> None:
        self.disconnects.labels(phase=phase).inc()

    def count_resume(self) -> None:
        self.resumes.inc()

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)

    def token_timer(self, clock: Callable[[], float] = time.monotonic) -> "TokenTimer":
        return TokenTimer(self, clock)

    def refresh_engine_gauges(self) -> None:
        if self._engine_stats is None:
            return
        stats = self._engine_stats()
        self.waiting.set(_field(stats, "waiting"))
        self.running.set(_field(stats, "running"))
        self.kv_usage.set(_field(stats, "kv_usage"))
        queried = _field(stats, "prefix_cache_queried_tokens")
        self.prefix_hit.set(_field(stats, "prefix_cache_hit_tokens") / queried if queried else 0.0)

    def render(self) -> bytes:
        self.refresh_engine_gauges()
        return generate_latest(self.registry)


class TokenTimer:
    """Latencies of one engine request: TTFT from creation, then the gap before every later token."""

    def __init__(self, metrics: ReplicaMetrics, clock: Callable[[], float]) -> None:
        self._metrics = metrics
        self._clock = clock
        self._start = clock()
        self._last: float | None = None

    def tokens(self, count: int) -> None:
        """Record that `count` tokens just arrived together (one engine output)."""
        if count <= 0:
            return
        now = self._clock()
        if self._last is None:
            self._metrics.ttft.observe(now - self._start)
        else:
            gap = (now - self._last) / count  # a multi-token output spreads its gap evenly
            for _ in range(count):
                self._metrics.itl.observe(gap)
        self._last = now


def _field(stats: Any, name: str) -> float:
    value = stats.get(name, 0) if isinstance(stats, dict) else getattr(stats, name, 0)
    return float(value or 0)
