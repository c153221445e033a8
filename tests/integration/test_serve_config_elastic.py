"""The elastic app deployed the way a Serve config file (KubeRay's RayService) deploys it: only
`app_builder` with a config naming Redis, no driver running `start_elastic`. The replica itself
must start the controller, which bootstraps the expert workers; then it serves the reference's
tokens and the admin API (keyed by the API keys when no admin keys are set) reports the devices.
"""

from __future__ import annotations

import httpx
import pytest

from actors.model.reference import greedy_reference
from cluster.config import MogeConfig
from cluster.cli.local_cluster import LocalCluster, free_port
from cluster.elastic.redis_server import EmbeddedRedis

pytestmark = pytest.mark.integration

KEY, ADMIN_KEY = "sk-serve-config", "sk-serve-config-admin"


def test_replica_starts_the_controller_when_deployed_from_a_serve_config(ray_local, reference_model):
    from cluster.elastic.controller import get_controller
    from cluster.replica.workers import WORKER_NAMESPACE
    from cluster.elastic.stack import ElasticStack

    redis = EmbeddedRedis().start()
    config = MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"num_kv_blocks": 128},
        server={"host": "127.0.0.1", "port": free_port(), "api_keys": [KEY], "admin_keys": [ADMIN_KEY]},
        data_plane={"transport": "grpc", "num_workers": 2, "worker_num_cpus": 0.25},
        elastic={"redis_url": redis.url, "key_prefix": "serve-config-test", "policy": {"max_devices": 4}},
    )
    cluster = LocalCluster(config, app_name="moge-serve-config", control_plane=False)
    try:
        base_url = cluster.start(timeout_s=240)
        assert cluster.stack is None  # nothing but the replica could have started the controller
        prompt = "deployed from a config file"
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            r = client.post("/v1/completions", json={"model": "tiny-moge", "prompt": prompt, "max_tokens": 8,
                                                      "temperature": 0, "return_token_ids": True})
            assert r.status_code == 200, r.text
            expected = greedy_reference(reference_model, reference_model.tokenizer.encode(prompt), 8)
            assert r.json()["choices"][0]["token_ids"] == expected
            assert client.get("/admin/status").status_code == 401  # an API key never opens /admin
            status = client.get("/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert status.status_code == 200, status.text
        assert status.json()["devices"] == 2 and status.json()["epoch"] == 0
    finally:
        cluster.stop()
        try:
            controller = get_controller(WORKER_NAMESPACE)
        except ValueError:
            controller = None
        ElasticStack(config, redis, controller, WORKER_NAMESPACE).stop()
