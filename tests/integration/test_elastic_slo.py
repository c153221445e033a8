"""The SLO policy scales on the TTFT clients see (invariant 8), by itself, over real HTTP: local Ray,
embedded redis-server, the controller, gRPC expert workers and one attention replica. More streams
than the replica's batch make requests queue, so TTFT (measured from arrival) misses its target and
the controller adds a device; when the load stops it gives the device back. No request fails, every
stream gets the single-process model's tokens, and /metrics agrees with the clients on TTFT.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from actors.model.reference import greedy_reference
from cluster.cli.local_cluster import LocalCluster, free_port
from cluster.config import MogeConfig
from tests.integration.conftest import RunningServer
from tests.integration.http_load import HttpLoad

pytestmark = pytest.mark.integration

API_KEY, ADMIN_KEY = "sk-elastic-slo", "sk-elastic-slo-admin"
STREAMS, MAX_TOKENS = 6, 10
PROMPTS = [f"queued stream {i}: waits for a batch slot" for i in range(STREAMS)]
SCALE_BOUND_S = 120  # the policy must act within this (its period is 0.5 s, its cooldown 3 s)


@pytest.fixture(scope="module")
def slo_server(ray_local) -> RunningServer:
    config = MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"max_num_seqs": 2, "num_kv_blocks": 256},  # STREAMS > max_num_seqs: requests queue
        server={"host": "127.0.0.1", "port": free_port(), "api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]},
        data_plane={"transport": "grpc", "num_workers": 1, "worker_num_cpus": 0.25},
        elastic={"key_prefix": "elastic-slo-test", "metrics_interval_s": 0.5,
                 "policy": {"name": "slo", "min_devices": 1, "max_devices": 2, "period_s": 0.5, "window_s": 3,
                            "cooldown_s": 3, "ttft_p99_ms": 250, "itl_p99_ms": 60_000}},
    )
    cluster = LocalCluster(config, app_name="moge-elastic-slo")
    try:
        base_url = cluster.start(timeout_s=240)
        yield RunningServer(base_url, API_KEY, "tiny-moge", cluster.stack.config)
    finally:
        cluster.stop()


def status(server: RunningServer) -> dict:
    r = httpx.get(f"{server.base_url}/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    r.raise_for_status()
    return r.json()


def metrics(server: RunningServer) -> str:
    with server.http() as client:
        return client.get("/metrics").text


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{[^}]*\})?") + " (.+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(m.lastindex)) if m else 0.0


def wait_for_devices(server: RunningServer, devices: int, load: HttpLoad | None = None) -> dict:
    deadline = time.monotonic() + SCALE_BOUND_S
    while time.monotonic() < deadline:
        s = status(server)
        if s["devices"] == devices and s["operation"] is None:
            return s
        assert load is None or not load.failures, load.failures
        time.sleep(0.25)
    raise AssertionError(f"not at {devices} devices within {SCALE_BOUND_S}s: {status(server)['policy']}")


def test_slo_policy_adds_a_device_under_queueing_and_gives_it_back_after(slo_server, reference_model):
    tok = reference_model.tokenizer
    expected = {p: greedy_reference(reference_model, tok.encode(p), MAX_TOKENS) for p in PROMPTS}
    assert status(slo_server)["devices"] == 1
    before = metrics(slo_server)
    with HttpLoad(slo_server, STREAMS, PROMPTS, MAX_TOKENS, 2 * SCALE_BOUND_S) as load:
        grown = wait_for_devices(slo_server, 2, load)
    after = metrics(slo_server)
    assert grown["ttft_p99_ms"] > 250  # what the policy read: only TTFT can miss (the ITL target is 60 s)
    wait_for_devices(slo_server, 1)  # idle: no request left to answer, so a device goes back

    assert load.failures == [] and len(load.results) >= STREAMS
    assert [p for p, ids, _ in load.results if ids != expected[p]] == []
    # /metrics saw the same requests the clients timed (the only generation traffic in between)
    count = sample(after, "moge_time_to_first_token_seconds_count") - sample(before, "moge_time_to_first_token_seconds_count")
    total = sample(after, "moge_time_to_first_token_seconds_sum") - sample(before, "moge_time_to_first_token_seconds_sum")
    timed = [first for _, _, first in load.results]
    assert count == len(timed)
    client_mean = sum(timed) / len(timed)
    server_mean = total / count
    assert server_mean == pytest.approx(client_mean, rel=0.10), f"/metrics {server_mean:.3f} s, clients {client_mean:.3f} s"
    assert client_mean > 0.25  # the load really missed the 250 ms target
    # the replica reads the controller's counters back once per metrics interval (0.5 s here)
    ops = 'kind="{}",outcome="done"'
    deadline = time.monotonic() + 30
    while True:
        end = metrics(slo_server)
        done = [sample(end, "moge_placement_operations_total", ops.format(k)) for k in ("scale_up", "scale_down")]
        if done == [1, 1] or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert done == [1, 1]
    assert sample(end, "moge_devices") == 1 and sample(end, "moge_placement_epoch") >= 2
