"""The whole elastic stack behind one Serve app, driven only over HTTP: local Ray, embedded
redis-server, the controller actor, gRPC expert workers and an attention replica on a free
127.0.0.1 port. Concurrent greedy streams from the official `openai` client keep flowing while the
admin API scales 1 -> 2 -> 4 -> 2 devices and migrates a group; every request must succeed with
the single-process model's tokens, and the placement must end consistent.
"""

from __future__ import annotations

import time

import httpx
import pytest

from actors.model.reference import greedy_reference
from cluster.config import MogeConfig
from cluster.cli.local_cluster import LocalCluster, free_port
from tests.integration.conftest import RunningServer
from tests.integration.http_load import HttpLoad

pytestmark = pytest.mark.integration

API_KEY, ADMIN_KEY = "sk-elastic-http", "sk-elastic-admin"
CONCURRENCY = 6
MAX_TOKENS = 12
PROMPTS = [f"stream {i}: tokens through the expert groups" for i in range(8)]
LOAD_BOUND_S = 150  # no stream runs longer than this, whatever happens


@pytest.fixture(scope="module")
def elastic_server(ray_local) -> RunningServer:
    config = MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"max_num_seqs": 16, "num_kv_blocks": 256},
        server={"host": "127.0.0.1", "port": free_port(), "api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]},
        data_plane={"transport": "grpc", "num_workers": 1, "worker_num_cpus": 0.25},
        elastic={"key_prefix": "elastic-http-test",
                 "policy": {"name": "none", "min_devices": 1, "max_devices": 4, "period_s": 0.5}},
    )
    cluster = LocalCluster(config, app_name="moge-elastic")
    try:
        base_url = cluster.start(timeout_s=240)
        yield RunningServer(base_url, API_KEY, "tiny-moge", cluster.stack.config)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def expected(reference_model) -> dict[str, list[int]]:
    tok = reference_model.tokenizer
    return {p: greedy_reference(reference_model, tok.encode(p), MAX_TOKENS) for p in PROMPTS}


def admin(server: RunningServer, method: str, path: str, key: str | None = ADMIN_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server.base_url}/admin/{path}", headers=headers, timeout=300, **kw)


def test_admin_api_checks_keys_and_input(elastic_server):
    assert admin(elastic_server, "GET", "status", key=None).status_code == 401
    assert admin(elastic_server, "GET", "status", key=API_KEY).status_code == 401  # admin keys only
    bad = [("scale", {"devices": 0}), ("scale", {"devices": 5}), ("migrate", {"group": 99, "worker": "w0"}),
           ("migrate", {"group": 0, "worker": "w42"})]
    for path, body in bad:
        r = admin(elastic_server, "POST", path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    status = admin(elastic_server, "GET", "status").json()
    assert status["devices"] == 1 and status["operation"] is None  # nothing was started by the refusals


def test_scaling_and_migration_under_http_load_keep_every_token(elastic_server, expected):
    before = admin(elastic_server, "GET", "status").json()
    steps = []
    with HttpLoad(elastic_server, CONCURRENCY, PROMPTS, MAX_TOKENS, LOAD_BOUND_S) as load:
        load.wait_for(CONCURRENCY)
        steps.append(admin(elastic_server, "POST", "scale", json={"devices": 2}))
        placement = admin(elastic_server, "GET", "status").json()["placement"]
        group = next(int(g) for g, holders in placement.items() if holders == ["w0"])
        steps.append(admin(elastic_server, "POST", "migrate", json={"group": group, "worker": "w1"}))
        load.wait_for(2)
        steps.append(admin(elastic_server, "POST", "scale", json={"devices": 4}))
        load.wait_for(CONCURRENCY)
        steps.append(admin(elastic_server, "POST", "scale", json={"devices": 2}))
        load.wait_for(CONCURRENCY)
    assert [r.status_code for r in steps] == [200] * len(steps), [r.text for r in steps]
    assert [r.json()["phase"] for r in steps] == ["done"] * len(steps), [r.json() for r in steps]
    assert load.failures == []
    assert len(load.results) >= 3 * CONCURRENCY
    wrong = [(p, ids) for p, ids, _ in load.results if ids != expected[p]]
    assert wrong == [], f"{len(wrong)} of {len(load.results)} requests changed tokens"

    after = admin(elastic_server, "GET", "status").json()
    assert after["epoch"] > before["epoch"] and after["epoch"] == steps[-1].json()["epoch"]
    assert after["devices"] == 2 and after["operation"] is None
    holders = after["placement"]
    assert sorted(int(g) for g in holders) == list(range(len(placement))) and all(holders.values())
    assert set(after["workers"]) == {w for hs in holders.values() for w in hs}
    assert all(w["state"] == "serving" for w in after["workers"].values())
    assert after["replicas"] and set(after["replicas"].values()) == {after["epoch"]}  # acknowledged
