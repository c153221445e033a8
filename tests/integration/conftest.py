"""Shared integration fixtures: ONE real local Ray cluster and ONE real Serve app per test session.

Starting Ray and Serve costs ~20 s on 2 cores, so every integration test shares them:

    def test_something(moge_server):
        moge_server.base_url          # "http://127.0.0.1:<free port>"  (real HTTP, loopback only)
        moge_server.api_key           # the Bearer key the server requires on all routes but /health
        moge_server.model             # served model id, "tiny-moge"
        moge_server.config            # the MogeConfig the app runs with
        moge_server.http()            # httpx.Client with base_url and the key set (close it)
        moge_server.openai()          # official openai.OpenAI client pointed at /v1
        moge_server.metric("moge_num_requests_running")   # a /metrics sample as float

    def test_ray_only(ray_local):     # just the Ray cluster (actors, controller, workers);
        ...                           # ray.init is already done in this process

    def test_tokens(reference_model): # the single-process model (actors.weights.loader.LoadedModel)
        ...                           # built from the same config: the greedy-token reference

To change what the server runs, override the session fixture `moge_server_config` in a conftest.py
of a sub-directory (it must stay session-scoped). Tests must leave the server as they found it (no
requests left running). Run integration tests under the machine's CPU lock, e.g.
    flock /tmp/moge-cpu.lock timeout 900 python -m pytest tests/integration -q
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from cluster.config import MogeConfig
from cluster.cli.local_cluster import LocalCluster, free_port, logical_cpus, remove_private_ray_dir, start_ray

TEST_API_KEY = "sk-moge-integration-test"
RAY_LOGICAL_CPUS = 4  # one replica plus room for expert workers started by other tests


@dataclass
class RunningServer:
    base_url: str
    api_key: str
    model: str
    config: MogeConfig

    def http(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def openai(self, api_key: str | None = None, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key or self.api_key, max_retries=0, timeout=60, **kwargs
        )

    def metric(self, name: str, labels: str = "") -> float:
        """Value of one sample line `name{labels} value` from /metrics (0 when absent)."""
        with self.http() as client:
            text = client.get("/metrics").text
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([-+0-9.eE]+|NaN)$"
        for line in text.splitlines():
            m = re.match(pattern, line)
            if m:
                return float(m.group(1))
        return 0.0


@pytest.fixture(scope="session")
def moge_server_config() -> MogeConfig:
    return MogeConfig.load(
        env={},  # the developer's MOGE_* variables must not change what the tests exercise
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        # caps on partial bodies above test_slow_clients.py's clients (every one held for the whole
        # body deadline, the slot-count cliff's scenario; the caps themselves are unit-tested)
        server={"host": "127.0.0.1", "port": free_port(), "api_keys": [TEST_API_KEY],
                "max_partial_bodies": 2000, "max_partial_bodies_per_client": 2000},
    )


@pytest.fixture(scope="session")
def ray_local(moge_server_config: MogeConfig) -> Iterator[None]:
    import ray

    if ray.is_initialized():  # another conftest already started it
        yield
        return
    root = start_ray(max(RAY_LOGICAL_CPUS, logical_cpus(moge_server_config)))
    try:
        yield
    finally:
        ray.shutdown()
        remove_private_ray_dir(root)


@pytest.fixture(scope="session")
def moge_server(ray_local: None, moge_server_config: MogeConfig) -> Iterator[RunningServer]:
    cluster = LocalCluster(moge_server_config)
    try:
        base_url = cluster.start(timeout_s=180)
        with httpx.Client(timeout=30) as client:
            models = client.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        models.raise_for_status()
        yield RunningServer(base_url, TEST_API_KEY, models.json()["data"][0]["id"], moge_server_config)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def reference_model(moge_server_config: MogeConfig):
    from actors.weights.loader import load_model

    m = moge_server_config.model
    return load_model(m.source, m.dtype, "cpu", n_groups=m.n_groups, seed=m.seed, name=m.name)
