"""Latency metrics from a request's arrival (invariant 8): the timer with an injected clock, the
vLLM-named families, and /metrics against what real HTTP clients measure while requests queue
(a real tiny engine behind the FastAPI app, served by uvicorn on 127.0.0.1)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.serve.metrics.replica import ReplicaMetrics

WAIT_S = 120
CLIENTS = Path(__file__).with_name("stream_clients.py")


@dataclass
class Out:
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 5
    completion_tokens: int = 0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    produced_at: float | None = None


def samples(metrics: ReplicaMetrics) -> dict[str, float]:
    """Every sample of a render, `name{labels}` -> value, with the labels as rendered."""
    out = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


VLLM = '{engine="0",model_name="m"}'


def test_the_timer_measures_from_arrival_and_splits_a_folded_gap():
    now = [100.0]
    metrics = ReplicaMetrics("m", clock=lambda: now[0])
    timer = metrics.request_timer(arrival=100.0)
    now[0] = 100.5  # queued 0.3 s, prefilled 0.1 s, handed to the client at 0.5 s
    timer.observe(Out([7], completion_tokens=1, scheduled_at=100.3, first_token_at=100.4, produced_at=100.4))
    now[0] = 100.9
    timer.observe(Out([8, 9], completion_tokens=3, scheduled_at=100.3, first_token_at=100.4, produced_at=100.8))
    now[0] = 101.0
    timer.observe(Out([], True, "length", completion_tokens=3, scheduled_at=100.3, first_token_at=100.4,
                      produced_at=100.8))
    s = samples(metrics)
    assert s["moge_time_to_first_token_seconds_sum"] == pytest.approx(0.5)
    assert s[f"vllm:time_to_first_token_seconds_sum{VLLM}"] == pytest.approx(0.5)
    assert s["moge_inter_token_latency_seconds_count"] == 2  # two tokens shared the 0.4 s gap
    assert s[f"vllm:inter_token_latency_seconds_sum{VLLM}"] == pytest.approx(0.4)
    assert s[f"vllm:time_per_output_token_seconds_count{VLLM}"] == 2
    assert s[f"vllm:request_queue_time_seconds_sum{VLLM}"] == pytest.approx(0.3)
    assert s[f"vllm:request_prefill_time_seconds_sum{VLLM}"] == pytest.approx(0.1)
    assert s[f"vllm:request_decode_time_seconds_sum{VLLM}"] == pytest.approx(0.4)
    assert s[f"vllm:request_inference_time_seconds_sum{VLLM}"] == pytest.approx(0.5)
    assert s[f"vllm:request_time_per_output_token_seconds_sum{VLLM}"] == pytest.approx(0.2)
    assert s[f"vllm:e2e_request_latency_seconds_sum{VLLM}"] == pytest.approx(1.0)
    assert s[f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}}'] == 1
    assert s[f"vllm:request_generation_tokens_sum{VLLM}"] == 3 and s[f"vllm:request_prompt_tokens_sum{VLLM}"] == 5
    assert s[f"vllm:generation_tokens_total{VLLM}"] == 3 and s[f"vllm:prompt_tokens_total{VLLM}"] == 5


def test_a_request_the_client_left_counts_as_aborted_once():
    now = [0.0]
    metrics = ReplicaMetrics("m", clock=lambda: now[0])
    timer = metrics.request_timer(arrival=0.0)
    now[0] = 2.0
    timer.close()
    timer.close()
    s = samples(metrics)
    assert s[f'vllm:request_success_total{{engine="0",finished_reason="abort",model_name="m"}}'] == 1
    assert s[f"vllm:e2e_request_latency_seconds_sum{VLLM}"] == pytest.approx(2.0)
    assert s["moge_time_to_first_token_seconds_count"] == 0


def test_engine_state_is_read_at_scrape_time_under_both_names():
    stats = {"waiting": 3, "running": 2, "kv_usage": 0.25, "preemptions": 4, "prefix_cache_queried_tokens": 40,
             "prefix_cache_hit_tokens": 10}
    s = samples(ReplicaMetrics("m", lambda: stats))
    assert s["moge_num_requests_waiting"] == 3 and s[f"vllm:num_requests_waiting{VLLM}"] == 3
    assert s["moge_num_requests_running"] == 2 and s[f"vllm:num_requests_running{VLLM}"] == 2
    assert s["moge_kv_cache_usage_ratio"] == 0.25 and s[f"vllm:kv_cache_usage_perc{VLLM}"] == 0.25
    assert s[f"vllm:prefix_cache_queries_total{VLLM}"] == 40 and s[f"vllm:prefix_cache_hits_total{VLLM}"] == 10
    assert s[f"vllm:num_preemptions_total{VLLM}"] == 4 and s["moge_prefix_cache_hit_ratio"] == 0.25


# ---- /metrics against real HTTP clients -----------------------------------------------------------

STREAMS, MAX_NUM_SEQS, MAX_TOKENS = 8, 2, 12


@pytest.fixture(scope="module")
def served():
    """A tiny-moge engine behind the HTTP app (ingress and server in one process), on a free 127.0.0.1 port (uvicorn)."""
    import uvicorn

    from actors.engine.async_engine import AsyncEngine
    from actors.engine.engine import EngineSpec, LLMEngine
    from actors.weights.loader import load_model
    from cluster.cli.local_cluster import free_port
    from cluster.config import MogeConfig
    from cluster.serve.ingress.http_app import build_http_app
    from cluster.serve.openai_server import OpenAIServer, ServedModel

    tiny = load_model("preset:tiny-moge", "float32", "cpu")
    engine = AsyncEngine(LLMEngine(tiny, EngineSpec(256, 128, 16, MAX_NUM_SEQS, 256)))
    cfg = MogeConfig.load(env={}, server={"max_waiting_requests": STREAMS})
    served_model = ServedModel("tiny-moge", tiny.tokenizer, 256)
    metrics = ReplicaMetrics("tiny-moge", engine.stats, 256)
    app = build_http_app(OpenAIServer(engine, served_model, cfg.server, metrics))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert server.started
        yield f"http://127.0.0.1:{port}", metrics
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        engine.shutdown()


def _metric(text: str, name: str) -> float:
    m = re.search("^" + re.escape(name) + r"(\{[^}]*\})? ([-+0-9.eE]+)$", text, re.M)
    return float(m.group(2)) if m else 0.0


def test_streamed_ttft_on_metrics_is_what_queued_clients_see(served):
    base, _ = served
    names = ["moge_time_to_first_token_seconds_sum", "moge_time_to_first_token_seconds_count",
             "vllm:time_to_first_token_seconds_sum", "vllm:request_queue_time_seconds_sum",
             "vllm:e2e_request_latency_seconds_count"]
    run = subprocess.run([sys.executable, str(CLIENTS), base, str(STREAMS), str(MAX_TOKENS)], capture_output=True,
                         text=True, timeout=WAIT_S, check=True)
    result = json.loads(run.stdout)
    seen = result["ttft_s"]
    got = {n: _metric(result["after"], n) - _metric(result["before"], n) for n in names}
    assert got["moge_time_to_first_token_seconds_count"] == STREAMS == got["vllm:e2e_request_latency_seconds_count"]
    client_mean = sum(seen) / STREAMS
    server_mean = got["moge_time_to_first_token_seconds_sum"] / STREAMS
    assert max(seen) > 3 * min(seen)  # STREAMS > max_num_seqs: later requests really waited
    assert server_mean == pytest.approx(client_mean, rel=0.10)
    assert got["vllm:time_to_first_token_seconds_sum"] == pytest.approx(got["moge_time_to_first_token_seconds_sum"])
    assert got["vllm:request_queue_time_seconds_sum"] / STREAMS > 0.3 * server_mean  # waiting is most of it
