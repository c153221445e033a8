"""Streaming HTTP load for the elastic integration tests: `concurrency` threads, each streaming
greedy completions from the official `openai` client one after another until stopped (or
`bound_s`); every request's prompt, token ids and time to its first token, or its failure."""

from __future__ import annotations

import threading
import time

from tests.integration.conftest import RunningServer


class HttpLoad:
    def __init__(self, server: RunningServer, concurrency: int, prompts: list[str], max_tokens: int,
                 bound_s: float = 150) -> None:
        self.server = server
        self.prompts, self.max_tokens = prompts, max_tokens
        self.results: list[tuple[str, list[int], float | None]] = []  # (prompt, token ids, seconds to first)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + bound_s
        self._threads = [threading.Thread(target=self._stream_loop, args=(i,), daemon=True) for i in range(concurrency)]

    def _stream_loop(self, slot: int) -> None:
        client = self.server.openai()
        n = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            prompt = self.prompts[(slot + n) % len(self.prompts)]
            n += 1
            ids: list[int] = []
            first = None
            try:
                start = time.monotonic()
                stream = client.completions.create(model=self.server.model, prompt=prompt, max_tokens=self.max_tokens,
                                                   temperature=0, stream=True, extra_body={"return_token_ids": True})
                for chunk in stream:
                    for choice in chunk.choices:
                        ids.extend(choice.model_extra.get("token_ids") or [])
                    if ids and first is None:
                        first = time.monotonic() - start
                self.results.append((prompt, ids, first))
            except Exception as e:  # noqa: BLE001 - every failure (5xx included) is counted, none tolerated
                self.failures.append(f"slot {slot} #{n}: {type(e).__name__}: {e}")
        client.close()

    def wait_for(self, n: int, timeout_s: float = 90) -> None:
        """Until `n` more requests have finished (bounded)."""
        target, deadline = len(self.results) + n, time.monotonic() + timeout_s
        while len(self.results) < target and time.monotonic() < deadline and not self.failures:
            if not any(t.is_alive() for t in self._threads):
                raise AssertionError(f"every load thread ended; failures: {self.failures}")
            time.sleep(0.05)

    def __enter__(self) -> "HttpLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
