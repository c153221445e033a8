"""The step lane on a real local Ray, over gloo on loopback: expert workers as Ray actors, the test
process playing the attention replicas. Greedy tokens equal the single-process engine's for
tiny-moge and a tiny Qwen3-MoE checkpoint with D = 1 and 2 workers; two replicas stepping at the
same time share the workers (one lane thread per replica slot on each worker); a worker killed in
the middle of a step has its groups re-run on the replacement and every request completes.

    unshare -n bash -c 'ip link set lo up && exec timeout 900 \
        python -m pytest -q tests/integration/test_step_lane_cluster.py'
"""

from __future__ import annotations

import threading
import uuid

import pytest
import ray
import torch

from actors.experts.placement import pack_groups
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.lane.step_lane import LaneCarrier
from actors.experts.worker.spec import model_config_of
from cluster.elastic.worker_fleet import model_spec
from cluster.replica.workers import ReplicaWorkers, worker_ids
from cluster.replica.assemble import build_engine
from tests.integration.test_data_plane import generate, kill_worker, make_config, prompts, qwen3_checkpoint  # noqa: F401

pytestmark = pytest.mark.integration


def lane_replica(config, cfg, placement, refs, plane, ping_pong: bool):
    rid = uuid.uuid4().hex[:8]
    transport = client_transport(config, torch.device("cpu"), rid)
    remote = Dispatcher(cfg, transport, placement, {w: refs[w] for w in placement.workers}, replacer=plane.replace)
    experts = StepLaneExperts(remote, "cpu", slots=2, timeout_s=20, replica_id=rid)
    config = config.model_copy(update={"data_plane": config.data_plane.model_copy(update={"ping_pong": ping_pong})})
    engine, _ = build_engine(config, experts=experts)
    return engine, experts


class KillAtDispatch:
    """ExpertCompute wrapper: kills `victim` (and waits until Ray reports it dead) right before the
    n-th dispatch, so the failure lands in the middle of a step's layer loop."""

    def __init__(self, inner, handle, n: int) -> None:
        self.inner, self.handle, self.n, self.calls, self.killed_pid = inner, handle, n, 0, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch(self, *args):
        self.calls += 1
        if self.calls == self.n:
            self.killed_pid = kill_worker(self.handle)
        return self.inner.dispatch(*args)


@pytest.mark.parametrize("model", ["tiny-moge", "qwen3-moe"])
def test_step_lane_matches_single_process_and_survives_a_kill(ray_local, model, request):
    source = "preset:tiny-moge" if model == "tiny-moge" else request.getfixturevalue("qwen3_checkpoint")
    config = make_config(source, "collective", None if model == "tiny-moge" else 4)
    cfg = model_config_of(model_spec(config))
    batch = prompts(cfg.vocab_size)
    reference = generate([build_engine(config)[0]], batch)

    plane = ReplicaWorkers(config, namespace=f"sl-{uuid.uuid4().hex[:8]}")
    every = worker_ids(2)
    refs = plane.start(pack_groups(cfg.n_groups, every))
    try:
        # D = 1: one worker serves every group for one replica
        placement = pack_groups(cfg.n_groups, every[:1])
        ray.get(refs["w0"].handle.load_groups.remote(list(range(cfg.n_groups))))
        engine, experts = lane_replica(config, cfg, placement, refs, plane, ping_pong=True)
        try:
            assert generate([engine], batch) == reference
        finally:
            experts.close()
        ray.get(refs["w0"].handle.drop_groups.remote(list(pack_groups(cfg.n_groups, every).groups_of("w1"))))

        # D = 2, two replicas stepping concurrently on the same two workers (M:N)
        placement = pack_groups(cfg.n_groups, every)
        replicas = [lane_replica(config, cfg, placement, refs, plane, ping_pong=(i == 0)) for i in range(2)]
        before = {w: ray.get(refs[w].handle.lane_stats.remote())["steps"] for w in every}
        results: dict[int, dict] = {}

        def run(i):
            results[i] = generate([replicas[i][0]], batch)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        for _, experts in replicas:
            experts.close()
        assert results == {0: reference, 1: reference}
        for w in every:  # every worker served both replicas' steps over lanes
            assert ray.get(refs[w].handle.lane_stats.remote())["steps"] > before[w]
        if model != "tiny-moge":
            return

        # a worker killed mid-step: its groups re-run on the replacement, every request completes
        engine, experts = lane_replica(config, cfg, placement, refs, plane, ping_pong=False)
        killer = KillAtDispatch(experts, refs["w1"].handle, n=len(experts.moe_layers) + 2)
        engine.model.experts = killer  # the model asks its ExpertCompute; the runner finds the boundary through it
        try:
            got = generate([engine], batch)
        finally:
            experts.close()
        assert killer.killed_pid is not None and experts.lane_failures >= 1 and experts.remote.retries >= 1
        assert got == reference
        replacement = plane.fleet.handle("w1")
        assert ray.get(replacement.device_info.remote())["pid"] != killer.killed_pid
        assert ray.get(replacement.lane_stats.remote())["steps"] >= 1  # later steps use a lane to it
    finally:
        plane.stop(every)
