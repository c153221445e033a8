"""The metric families of one attention replica and their rendering.

Each replica owns a private CollectorRegistry: Ray's own metrics and any other replica living in
the same process never mix into it, and tests can build as many as they like.

Two sets of names. The `moge_` families are this project's own (and what the elastic policies tap:
`ttft`, `itl`). Next to them, the names vLLM serves (`vllm:` prefix, `model_name` and `engine`
labels, vLLM's units and buckets), so dashboards and autoscalers written for vLLM read this server
unchanged. Latencies are measured from the request's arrival at this replica (invariant 8:
what /metrics reports is what clients see) by cluster/serve/metrics/request_timer.py; engine state
(queue, running, KV use, prefix cache, preemptions) and the data plane are read at scrape time
(cluster/serve/metrics/scraped.py), so the step thread does no metrics work.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cluster.serve.metrics.request_timer import RequestTimer
from cluster.serve.metrics.scraped import EngineCollector, ExpertCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# seconds; TTFT on a CPU demo reaches seconds, on a GPU tens of milliseconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# vLLM's own boundaries (vllm/v1/metrics/loggers.py), so histogram_quantile reads the same on both
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
VLLM_LABELS = ("model_name", "engine")


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's request-length buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(m * scale)
        scale *= 10


class VllmFamilies:
    """The request-level `vllm:` families, already bound to this replica's label values."""

    def __init__(self, registry: CollectorRegistry, model: str, max_model_len: int) -> None:
        values = {"model_name": model, "engine": "0"}

        def hist(name: str, doc: str, buckets) -> Any:
            return Histogram(name, doc, VLLM_LABELS, buckets=buckets, registry=registry).labels(**values)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, VLLM_LABELS, registry=registry).labels(**values)

        self.ttft = hist("vllm:time_to_first_token_seconds", "arrival at the replica to the first token handed out",
                         VLLM_TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "gap between consecutive tokens handed out", VLLM_ITL_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds", "older name of vllm:inter_token_latency_seconds "
                         "(the same observations)", VLLM_ITL_BUCKETS)
        self.request_tpot = hist("vllm:request_time_per_output_token_seconds", "decode time / (generated tokens - 1), "
                                 "per finished request", VLLM_ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "arrival to the end of the request", VLLM_REQUEST_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "arrival to the first engine step that ran the request",
                          VLLM_REQUEST_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds", "first step that ran the request to its first token",
                            VLLM_REQUEST_BUCKETS)
        self.decode = hist("vllm:request_decode_time_seconds", "first token to last token, per request",
                           VLLM_REQUEST_BUCKETS)
        self.inference = hist("vllm:request_inference_time_seconds", "first step that ran the request to its last "
                              "token", VLLM_REQUEST_BUCKETS)
        lengths = token_buckets(max_model_len)
        self.prompt_len = hist("vllm:request_prompt_tokens", "prompt tokens per finished request", lengths)
        self.generation_len = hist("vllm:request_generation_tokens", "generated tokens per finished request", lengths)
        self.prompt_tokens = counter("vllm:prompt_tokens", "prompt tokens of requests that got their first token")
        self.generation_tokens = counter("vllm:generation_tokens", "tokens handed out to clients")
        success = Counter("vllm:request_success", "finished requests by finish reason (abort: the client left)",
                          [*VLLM_LABELS, "finished_reason"], registry=registry)
        self.success = {r: success.labels(finished_reason=r, **values) for r in FINISH_REASONS}


class ReplicaMetrics:
    """`part`: which families this registry renders. The ingress holds "http" (what HTTP answered:
    statuses, in-band errors, disconnects, resumes), each attention replica "engine" (tokens,
    latencies, engine and data-plane gauges), and the ingress's /metrics renders both, disjoint;
    "all" is one process doing both (unit tests, one-process tools)."""

    def __init__(self, model: str, engine_stats: Callable[[], Any] | None = None, max_model_len: int = 32768,
                 clock: Callable[[], float] = time.monotonic, part: str = "all") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._engine_stats = engine_stats
        self.clock = clock  # arrival and token times; the engine's timestamps use time.monotonic too
        http = self.registry if part in ("all", "http") else CollectorRegistry()
        # the other part's families still exist (callers need not know the part) but are never rendered
        r = self.registry if part in ("all", "engine") else CollectorRegistry()
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
            "moge_time_to_first_token_seconds", "request arrival at this replica to its first generated token",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "moge_inter_token_latency_seconds", "time between consecutive generated tokens", buckets=ITL_BUCKETS,
            registry=r,
        )
        info = Gauge("moge_model_info", "the model this replica serves", ["model"], registry=r)
        info.labels(model=model).set(1)
        self.vllm = VllmFamilies(r, model, max_model_len)
        r.register(EngineCollector(self._read_engine_stats, model))
        self._experts = ExpertCollector()
        r.register(self._experts)

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

    def request_timer(self, arrival: float | None = None) -> RequestTimer:
        """Latencies of one engine request that arrived at `arrival` (this clock; None: now)."""
        return RequestTimer(self, self.clock() if arrival is None else arrival, self.clock)

    def watch_experts(self, experts_metrics: Callable[[], dict], cluster_state: Callable[[], dict] | None = None) -> None:
        """Export the data plane too: `experts_metrics()` as Dispatcher.metrics() answers (group load,
        epoch, retries); `cluster_state()` the controller's counters (elastic mode)."""
        self._experts.watch(experts_metrics, cluster_state)

    def _read_engine_stats(self) -> Any:
        return None if self._engine_stats is None else self._engine_stats()

    def render(self) -> bytes:
        return generate_latest(self.registry)
