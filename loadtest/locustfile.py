"""Locust users for the OpenAI routes: /v1/completions and /v1/chat/completions, whole and streamed.

Besides one entry per route, streamed requests feed two entries of their own:
  TTFT  all streams   time from sending the request to the first content chunk
  ITL   all streams   each gap between two consecutive content chunks
so locust's CSVs and percentiles cover the two latencies users feel. Any non-200, malformed body,
empty completion, or stream that ends without `data: [DONE]` is a failure.

Run through `python -m loadtest.runner` (which starts the server and picks the traffic shape), or
directly: `locust -f loadtest/locustfile.py --host http://127.0.0.1:8000`.
Environment: MOGE_LOADTEST_API_KEY (Bearer key), MOGE_LOADTEST_MAX_TOKENS (default 16),
MOGE_LOADTEST_MODEL (default: the first id of /v1/models), MOGE_LOADTEST_TOKEN_IDS (1: ask for
token ids in streams, this server's extension), MOGE_LOADTEST_SHAPE (see traffic_curves.py).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

from loadtest import shapes, traffic_curves

MAX_TOKENS = int(os.environ.get("MOGE_LOADTEST_MAX_TOKENS", "16"))
# This server's extension: every streamed chunk carries its token ids, so a token that decodes to
# no text yet (part of a UTF-8 character) still marks time. Set 0 for other OpenAI servers.
TOKEN_IDS = os.environ.get("MOGE_LOADTEST_TOKEN_IDS", "1") == "1"
STREAM_ENTRY = "all streams"
PROMPTS = [
    "The capital of France is",
    "Explain mixture of experts in one sentence:",
    "Once upon a time, in a cluster far away,",
    "def fibonacci(n):",
    "Three reasons to autoscale accelerators:",
]

_curve = traffic_curves.curve_from_env()
if _curve is not None:
    # Locust picks up the one LoadTestShape class bound in this module.
    SelectedShape = shapes.SHAPES[os.environ[traffic_curves.ENV_SHAPE]]


class OpenAIUser(HttpUser):
    wait_time = between(0.05, 0.3)
    model: str | None = os.environ.get("MOGE_LOADTEST_MODEL") or None

    def on_start(self) -> None:
        key = os.environ.get("MOGE_LOADTEST_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        if OpenAIUser.model is None:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                try:
                    OpenAIUser.model = resp.json()["data"][0]["id"]
                except (ValueError, KeyError, IndexError, TypeError):
                    resp.failure(f"/v1/models gave no model id: {resp.text[:200]!r}")

    # ------------------------------------------------------------------------------------ tasks

    @task(2)
    def completion(self) -> None:
        self._whole("/v1/completions", {"prompt": random.choice(PROMPTS)}, lambda c: c.get("text"))

    @task(2)
    def chat(self) -> None:
        body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        self._whole("/v1/chat/completions", body, lambda c: (c.get("message") or {}).get("content"))

    @task(3)
    def completion_stream(self) -> None:
        self._stream("/v1/completions", {"prompt": random.choice(PROMPTS)}, lambda c: c.get("text"))

    @task(3)
    def chat_stream(self) -> None:
        body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        self._stream("/v1/chat/completions", body, lambda c: (c.get("delta") or {}).get("content"))

    # -------------------------------------------------------------------------------- requests

    def _body(self, extra: dict) -> dict:
        return {"model": self.model or "unknown", "max_tokens": MAX_TOKENS, "temperature": 0, **extra}

    def _whole(self, route: str, extra: dict, text_of) -> None:
        with self.client.post(route, json=self._body(extra), name=route, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                body = resp.json()
                text = text_of(body["choices"][0])
                tokens = body["usage"]["completion_tokens"]
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure(f"malformed body: {resp.text[:200]!r}")
                return
            if not isinstance(text, str) or tokens < 1:
                resp.failure(f"empty completion: {resp.text[:200]!r}")

    def _stream(self, route: str, extra: dict, text_of) -> None:
        name = f"{route} [stream]"
        body = self._body({**extra, "stream": True, **({"return_token_ids": True} if TOKEN_IDS else {})})
        started = time.perf_counter()
        chunk_times: list[float] = []  # arrival of every chunk that carries tokens
        with self.client.post(route, json=body, name=name, stream=True, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = False
            try:
                for raw in resp.iter_lines(decode_unicode=True):
                    if not raw or not raw.startswith("data:"):
                        continue
                    data = raw[len("data:"):].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        resp.failure(f"error event: {data[:200]}")
                        return
                    if any(text_of(c) or c.get("token_ids") for c in event.get("choices", [])):
                        chunk_times.append(time.perf_counter())
            except (ValueError, OSError) as e:  # bad JSON, connection cut mid-stream
                resp.failure(f"broken stream: {e!r}")
                return
            # The request's latency is the whole stream, not the time to the response headers.
            resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            if not done:
                resp.failure("stream ended without data: [DONE]")
                return
            if not chunk_times:
                resp.failure("stream carried no tokens")
                return
        self._record("TTFT", (chunk_times[0] - started) * 1000)
        for before, after in zip(chunk_times, chunk_times[1:]):
            self._record("ITL", (after - before) * 1000)

    def _record(self, kind: str, ms: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=STREAM_ENTRY, response_time=ms, response_length=0, exception=None, context={}
        )
