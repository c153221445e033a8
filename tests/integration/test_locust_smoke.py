"""Headless locust runs through loadtest.runner, with real HTTP on 127.0.0.1.

- against a small OpenAI-compatible stub (SSE streaming), to pin down what the locustfile records
  (TTFT and ITL entries, whole-stream latency) and that a failing server fails the run;
- against the real embedded cluster (`python -m cluster.cli.main serve`): CI's smoke test, which fails
  on any failed request.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from loadtest import runner
from loadtest.summary import read_summary

pytestmark = pytest.mark.integration

# The second token decodes to no text (like half of a UTF-8 character): it still counts as a token
# because the locustfile asks for token ids.
TOKENS = ["Hello", "", " the", " stub", "!"]
TOKEN_GAP_S = 0.02


def _stub_app(state: dict):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        state["metrics_calls"] += 1
        return "# TYPE moge_devices gauge\nmoge_devices 3\n"

    async def answer(body: dict, chat: bool):
        state["requests"] += 1
        if body.get("model") != "stub-model" or body.get("max_tokens", 0) < 1:
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        if chat and state["fail_chat"]:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        usage = {"prompt_tokens": 3, "completion_tokens": len(TOKENS), "total_tokens": 3 + len(TOKENS)}
        text = "".join(TOKENS)
        if not body.get("stream"):
            choice = {"index": 0, "finish_reason": "stop"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {"id": "x", "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}

        async def events():
            for i, token in enumerate(TOKENS):
                await asyncio.sleep(TOKEN_GAP_S)
                choice = {"index": 0, "finish_reason": None}
                choice.update({"delta": {"content": token}} if chat else {"text": token})
                if body.get("return_token_ids"):
                    choice["token_ids"] = [100 + i]
                yield f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: dict):
        return await answer(body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        return await answer(body, chat=True)

    return app


@pytest.fixture
def stub_server():
    import uvicorn

    state = {"fail_chat": False, "requests": 0, "metrics_calls": 0}
    port = runner.free_port()
    server = uvicorn.Server(uvicorn.Config(_stub_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)


def _history_kinds(out: Path) -> set[str]:
    with (out / "locust_stats_history.csv").open() as f:
        return {row["Type"] for row in csv.DictReader(f)}


def test_stream_latencies_are_recorded_as_their_own_entries(stub_server, tmp_path):
    url, state = stub_server
    rc = runner.main(["--url", url, "--shape", "step", "--users", "3", "--duration", "8", "--out", str(tmp_path)])
    assert rc == 0, (tmp_path / "locust.log").read_text()
    summary = read_summary(tmp_path / "locust_stats.csv")
    assert summary.failure_count == 0 and summary.request_count > 10
    posts = summary.request_count - summary.entry("GET", "/v1/models").count
    assert 0 <= state["requests"] - posts <= 3  # at most the users' last in-flight requests go unrecorded
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/completions [stream]", "/v1/chat/completions [stream]"):
        assert summary.entry("POST", route).count > 0, route
    ttft, itl = summary.entry("TTFT"), summary.entry("ITL")
    streams = summary.entry("POST", "/v1/completions [stream]").count + summary.entry("POST", "/v1/chat/completions [stream]").count
    # One TTFT per stream, one ITL per gap between the stub's 5 chunks.
    assert ttft.count == streams and itl.count == streams * (len(TOKENS) - 1)
    assert ttft.p50_ms >= TOKEN_GAP_S * 1000 * 0.9 and itl.p50_ms >= TOKEN_GAP_S * 1000 * 0.9
    # A stream's own latency is the whole stream, so at least TTFT plus the remaining gaps.
    assert summary.entry("POST", "/v1/chat/completions [stream]").p50_ms >= TOKEN_GAP_S * 1000 * len(TOKENS) * 0.9
    assert {"POST", "TTFT", "ITL"} <= _history_kinds(tmp_path)
    with (tmp_path / "devices.csv").open() as f:
        devices = list(csv.DictReader(f))
    assert devices and {d["Devices"] for d in devices} == {"3"} and {d["Source"] for d in devices} == {"metrics"}
    png = (tmp_path / "loadtest.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "requests, 0 failed" in (tmp_path / "summary.md").read_text()


def test_a_failing_route_fails_the_run(stub_server, tmp_path):
    url, state = stub_server
    state["fail_chat"] = True
    rc = runner.main(["--url", url, "--shape", "constant", "--users", "2", "--duration", "5", "--out", str(tmp_path)])
    assert rc == 1
    summary = read_summary(tmp_path / "locust_stats.csv")
    assert summary.entry("POST", "/v1/chat/completions").failures > 0
    assert summary.entry("POST", "/v1/completions").failures == 0


def test_only_loopback_targets_are_accepted(tmp_path):
    assert runner.main(["--url", "http://10.1.2.3:8000", "--duration", "1", "--out", str(tmp_path)]) == 2


@pytest.mark.skipif(importlib.util.find_spec("cluster.cli.main") is None, reason="cluster/cli/main.py (moge serve) not in this tree yet")
def test_embedded_cluster_serves_a_short_load_without_a_failed_request(tmp_path):
    rc = runner.main(["--shape", "constant", "--users", "3", "--duration", "25", "--server-timeout", "420", "--out", str(tmp_path)])
    log = lambda name: (tmp_path / name).read_text()[-4000:] if (tmp_path / name).exists() else ""  # noqa: E731
    assert rc == 0, f"locust:\n{log('locust.log')}\nserver:\n{log('server.log')}"
    summary = read_summary(tmp_path / "locust_stats.csv")
    assert summary.failure_count == 0 and summary.request_count > 0
    assert summary.entry("TTFT").count > 0
