"""The latencies of one engine request, from its arrival at this replica, as its client sees them.

    arrival ──queue──> scheduled ──prefill──> first token ──decode──> last token
       └──────────── TTFT ────────────────────────┘   (ITL between tokens)
       └──────────────────────── E2E ────────────────────────────┘

Arrival is when the HTTP request reached the ingress (stamped by its outermost middleware and carried
to the attention replica in RequestContext.arrival, so TTFT includes the hop and Serve's routing),
TTFT and ITL are taken when the replica hands an output to the ingress, E2E when the request ends;
queue, prefill and decode come from the engine's own timestamps (RequestOutput.scheduled_at,
first_token_at, produced_at), all on the replica's monotonic clock. An output that carries
several tokens (a stream that fell behind) spreads its gap evenly over them.
"""

from __future__ import annotations

from typing import Any, Callable


class RequestTimer:
    def __init__(self, metrics: Any, arrival: float, clock: Callable[[], float]) -> None:
        self._m = metrics  # ReplicaMetrics
        self._arrival = arrival
        self._clock = clock
        self._first: float | None = None
        self._last: float | None = None
        self._out: Any = None  # the latest output
        self._ended = False

    def resumed(self) -> None:
        """A continuation (the ingress resumed the request here after its replica died): the client
        had its first token already, so TTFT is not taken again; gaps count from now."""
        self._first = self._last = self._clock()

    def observe(self, out: Any) -> None:
        """One engine output is about to be sent (or collected)."""
        if self._ended:
            return
        now = self._clock()
        n = len(out.new_token_ids)
        m, v = self._m, self._m.vllm
        if n:
            if self._first is None:
                self._first = now
                m.ttft.observe(now - self._arrival)
                v.ttft.observe(now - self._arrival)
                v.prompt_tokens.inc(getattr(out, "prompt_tokens", 0))
            else:
                gap = (now - self._last) / n
                for _ in range(n):
                    m.itl.observe(gap)
                    v.itl.observe(gap)
                    v.tpot.observe(gap)
            v.generation_tokens.inc(n)
            self._last = now
        self._out = out
        if out.finished:
            self._end(out.finish_reason or "stop", now)

    def close(self, error: bool = False) -> None:
        """The front is done with the request: one that did not finish was aborted (client gone) or failed."""
        if not self._ended:
            self._end("error" if error else "abort", self._clock())

    def _end(self, reason: str, now: float) -> None:
        self._ended = True
        v = self._m.vllm
        v.e2e.observe(now - self._arrival)
        v.success.get(reason, v.success["abort"]).inc()
        out = self._out
        if out is None:
            return
        completion = getattr(out, "completion_tokens", 0)
        v.prompt_len.observe(getattr(out, "prompt_tokens", 0))
        v.generation_len.observe(completion)
        scheduled = getattr(out, "scheduled_at", None)
        first = getattr(out, "first_token_at", None)
        produced = getattr(out, "produced_at", None)
        if scheduled is None:
            return  # never scheduled (aborted while queued) or an engine that keeps no times
        v.queue.observe(max(0.0, scheduled - self._arrival))
        if first is None or produced is None:
            return
        v.prefill.observe(first - scheduled)
        v.decode.observe(produced - first)
        v.inference.observe(produced - scheduled)
        if completion > 1:
            v.request_tpot.observe((produced - first) / (completion - 1))
