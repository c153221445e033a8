"""Group migration over the device lane (gloo on CPU) and its fallbacks, and the one-device case
grown live: a replica holding attention and every group in process scales 1 -> 2 -> 1 by moving
half the groups to an expert worker and back, under concurrent greedy streams. Real Ray, real
redis-server, real gRPC workers, loopback only. Every request must finish with the single-process
model's tokens."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from cluster.config import MogeConfig
from tests.integration.test_elastic import MAX_TOKENS, PROMPTS, Load, check, ctl

pytestmark = pytest.mark.integration

SPEC = {"source": "preset:tiny-moge", "dtype": "float32", "device": "cpu", "seed": 0}
FULL_CHAIN = ["device", "object_store", "checkpoint"]


@pytest.fixture(scope="module")
def local_config() -> MogeConfig:
    return MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
        engine={"max_num_seqs": 16, "num_kv_blocks": 256},
        data_plane={"transport": "grpc", "num_workers": 1, "worker_num_cpus": 0.25, "ping_pong": False},
        elastic={"key_prefix": "local-test", "local_groups": True, "migration_source": "device",
                 "migration_deadline_s": 20, "policy": {"name": "none", "min_devices": 1, "max_devices": 2}},
    )


@pytest.fixture(scope="module")
def stack(ray_local, local_config):
    from cluster.elastic.stack import start_elastic

    s = start_elastic(local_config)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def replica(stack):
    from actors.engine.async_engine import AsyncEngine
    from cluster.replica.elastic_side import ElasticReplica
    from cluster.replica.assemble import build_engine

    er = ElasticReplica.connect(stack.config, "local-replica")
    engine, loaded = build_engine(stack.config, experts=er.experts)
    async_engine = AsyncEngine(engine)
    er.attach(async_engine)
    try:
        yield async_engine, loaded, er
    finally:
        async_engine.shutdown()
        er.close()


@pytest.fixture(scope="module")
def expected(replica, reference_model):
    from actors.model.reference import greedy_reference

    _, loaded, _ = replica
    # (tokens, None): this module serves in the default mode, so log-probabilities are not compared
    return {p: (greedy_reference(reference_model, loaded.tokenizer.encode(p), MAX_TOKENS), None) for p in PROMPTS}


def test_scale_one_device_to_two_and_back_under_load(stack, replica, expected):
    engine, loaded, er = replica
    assert ctl(stack, "placement")["holders"] == [["local"]] * 4 and er.local.holder.groups == (0, 1, 2, 3)
    with Load(engine, loaded.tokenizer, 4) as load:
        load.wait_for(4)
        up = ctl(stack, "scale", 2)
        load.wait_for(4)
        mid_local = er.local.holder.groups
        mid_calls = _worker_calls(stack, "w0")
        down = ctl(stack, "scale", 1)
        load.wait_for(4)
    assert up["phase"] == "done" and down["phase"] == "done", (up, down)
    assert up["loads"] and {a["source"] for a in up["loads"]} == {"device"}, up["loads"]
    assert sorted(g for a in up["loads"] for g in a["groups"]) == [2, 3]
    assert mid_local == (0, 1) and mid_calls > 0  # half the groups served by the worker meanwhile
    assert [f["source"] for f in er.local.fetches] == ["device"] and er.local.fetches[0]["groups"] == [2, 3]
    assert ctl(stack, "placement")["holders"] == [["local"]] * 4
    assert er.local.holder.groups == (0, 1, 2, 3) and er.epoch == down["epoch"]
    check(load, expected)
    assert ctl(stack, "consistency") == []
    assert ctl(stack, "status")["workers"] == {}  # the worker was retired


def _worker_calls(stack, wid):
    import ray

    from cluster.elastic.worker_fleet import WorkerFleet

    return ray.get(WorkerFleet(stack.config, stack.namespace).handle(wid).stats.remote(), timeout=10)["calls"]


@pytest.fixture()
def two_workers(ray_local):
    import ray

    from actors.experts.worker.spec import worker_options
    from actors.experts.worker.worker import ExpertWorker

    actor = ray.remote(ExpertWorker)
    made = [actor.options(**worker_options("cpu", num_cpus=0.25)).remote(w, SPEC, "inprocess") for w in ("h", "t")]
    try:
        yield made
    finally:
        for h in made:
            ray.kill(h)


def _held(handle, groups):
    import ray

    return ray.get(handle.export_groups.remote(groups), timeout=30)


def test_device_lane_moves_exact_bytes_then_falls_back_object_store_then_checkpoint(two_workers):
    import ray

    holder, target = two_workers
    ray.get(holder.load_groups.remote([0, 1, 2]), timeout=60)
    copy = ray.get(holder.endpoint.remote(), timeout=30)["copy"]

    out = ray.get(target.load_groups.remote([0], holder, FULL_CHAIN, copy, 10), timeout=60)
    assert out["source"] == "device" and [a["source"] for a in out["attempts"]] == ["device"]
    _same(_held(holder, [0]), _held(target, [0]))

    # a lane that does not answer (nothing listens there): the object store delivers
    dead_lane = {**copy, "port": _closed_port()}
    out = ray.get(target.load_groups.remote([1], holder, FULL_CHAIN, dead_lane, 5), timeout=60)
    assert out["source"] == "object_store" and "error" in out["attempts"][0]
    _same(_held(holder, [1]), _held(target, [1]))

    # the holder is frozen (SIGSTOP): both of its paths hit the deadline, the checkpoint delivers
    pid = ray.get(holder.device_info.remote(), timeout=30)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        out = ray.get(target.load_groups.remote([2], holder, FULL_CHAIN, copy, 2), timeout=60)
        took = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    assert out["source"] == "checkpoint", out
    assert [a["source"] for a in out["attempts"]] == FULL_CHAIN
    assert all("error" in a for a in out["attempts"][:2]) and took < 20
    _same(_held(holder, [2]), _held(target, [2]))


def _same(a, b):
    for g in a:
        for name in ("w13", "w2"):
            for layer, t in a[g][name].items():
                assert torch.equal(t, b[g][name][layer]), (g, name, layer)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
