"""Continuous, bounded greedy load on an attention replica's AsyncEngine, for the Ray-nodes scenario.

`concurrency` streams each loop over the prompts on their own event loop (a background thread)
until stopped or until `max_requests` have been sent; every request's tokens are kept so they can
be compared with the single-process reference, and every failure (exception or a finish reason
other than stop/length) is recorded, never retried.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from actors.engine.sampling_params import SamplingParams


@dataclass
class Finished:
    prompt: str
    token_ids: list[int]
    finished_at: float  # time.monotonic() when its last token arrived


@dataclass
class GreedyLoad:
    engine: object  # actors.engine.async_engine.AsyncEngine
    tokenizer: object
    prompts: list[str]
    max_tokens: int
    concurrency: int
    max_requests: int = 5000  # bound on the whole run, whatever the scenario does
    results: list[Finished] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._sent = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="greedy-load", daemon=True)

    def start(self) -> "GreedyLoad":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 120) -> None:
        """Stop sending; requests in flight finish (they are part of the result)."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.failures.append(f"load did not drain within {timeout_s}s")

    def wait_for(self, n: int, timeout_s: float = 120) -> int:
        """Block until `n` more requests finish (bounded); -> how many did."""
        start = len(self.results)
        deadline = time.monotonic() + timeout_s
        while len(self.results) < start + n and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return len(self.results) - start

    def _next_id(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests:
                return None
            self._sent += 1
            return self._sent

    async def _stream(self, slot: int) -> None:
        while (n := self._next_id()) is not None:
            prompt = self.prompts[(slot + n) % len(self.prompts)]
            rid = f"nodes-{slot}-{n}"
            ids: list[int] = []
            try:
                params = SamplingParams(temperature=0, max_tokens=self.max_tokens)
                async for out in self.engine.generate(rid, self.tokenizer.encode(prompt), params):
                    ids.extend(out.new_token_ids)
                    if out.finished and out.finish_reason not in ("stop", "length"):
                        self.failures.append(f"{rid}: finish_reason {out.finish_reason}")
                self.results.append(Finished(prompt, ids, time.monotonic()))
            except Exception as e:  # noqa: BLE001 - every failure is counted, none tolerated
                self.failures.append(f"{rid}: {type(e).__name__}: {e}")

    async def _main(self) -> None:
        await asyncio.gather(*(self._stream(i) for i in range(self.concurrency)))
