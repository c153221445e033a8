"""The disaggregated data plane on a real local Ray: expert workers as Ray actors, the test process
playing one or two attention replicas, over gRPC and collective (gloo) on loopback.

For each transport and model (tiny-moge preset, a tiny random Qwen3-MoE checkpoint): D = 1, 2, 4
workers with 1 or 2 replicas produce exactly the single-process engine's greedy tokens; each worker
holds only its groups' bytes and got exactly the CPU slot it asked for; a worker killed in the
middle of a step is replaced and no request fails.

Run under the CPU lock:  flock /tmp/moge-cpu.lock timeout 900 python -m pytest tests/integration/test_data_plane.py -q
"""

from __future__ import annotations

import time
import uuid

import pytest
import ray
import torch

from cluster.replica.assemble import build_engine
from actors.experts.worker.spec import model_config_of
from actors.experts.placement import pack_groups
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.engine.sampling_params import SamplingParams
from cluster.config import MogeConfig
from cluster.replica.workers import ReplicaWorkers, worker_ids
from cluster.elastic.worker_fleet import model_spec
from tests.checkpoints import write_qwen3_moe

pytestmark = pytest.mark.integration

WORKER_CPUS = 0.25
MAX_TOKENS = 5


def prompts(vocab: int) -> list[list[int]]:
    """Mixed lengths: 1 to 23 tokens, so steps mix prefill and decode."""
    return [[(7 * i + 3 * j) % vocab for j in range(n)] for i, n in enumerate([1, 9, 23, 4, 14])]


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    return write_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe"))


def make_config(source: str, transport: str, n_groups: int | None) -> MogeConfig:
    return MogeConfig.load(
        env={},
        model={"source": source, "device": "cpu", "dtype": "float32", "n_groups": n_groups, "max_model_len": 128},
        engine={"num_kv_blocks": 64, "max_num_seqs": 8},
        data_plane={"transport": transport, "num_workers": 4, "worker_num_cpus": WORKER_CPUS,
                    "advertise_host": "127.0.0.1", "call_timeout_s": 20},
    )


def generate(engines, prompt_lists) -> dict[int, list[int]]:
    """Prompts dealt round-robin to the replicas, every replica stepped in turn until all finish."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {i: [] for i in range(len(prompt_lists))}
    for i, p in enumerate(prompt_lists):
        engines[i % len(engines)].add_request(str(i), p, params)
    for _ in range(10 * MAX_TOKENS + 50):
        if not any(e.has_unfinished() for e in engines):
            break
        for e in engines:
            for o in e.step():
                out[int(o.request_id)] += o.new_token_ids
    assert not any(e.has_unfinished() for e in engines)
    return out


def replica(config, cfg, placement, refs, plane, ping_pong: bool):
    transport = client_transport(config, torch.device("cpu"), uuid.uuid4().hex[:8])
    remote = Dispatcher(cfg, transport, placement, {w: refs[w] for w in placement.workers}, replacer=plane.replace)
    config = config.model_copy(update={"data_plane": config.data_plane.model_copy(update={"ping_pong": ping_pong})})
    engine, loaded = build_engine(config, experts=remote)
    return engine, remote


def group_bytes(cfg) -> int:
    per_layer = cfg.experts_per_group * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # w13 + w2, fp32
    return per_layer * sum(cfg.is_moe_layer(layer) for layer in range(cfg.num_layers))



def kill_worker(handle) -> int:
    """Kill an expert worker actor and return once Ray reports it dead; -> its pid. The kill
    travels through the GCS while a ping goes straight to the actor: an early ping may still be
    answered, so ask until Ray says the actor is gone (bounded)."""
    pid = ray.get(handle.device_info.remote())["pid"]
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(handle.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return pid
        assert time.monotonic() < deadline, "the killed worker still answers after 60 s"

class KillOnCall:
    """Transport wrapper: kills `victim` (and waits until Ray reports it dead) right before the
    n-th call to it, so the failure lands in the middle of a step."""

    def __init__(self, inner, victim: str, handle, n: int) -> None:
        self.inner, self.victim, self.handle, self.n, self.killed_pid = inner, victim, handle, n, None
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def call(self, worker_id, *args):
        if worker_id == self.victim and self.killed_pid is None:
            self.calls += 1
            if self.calls == self.n:
                self.killed_pid = kill_worker(self.handle)
        return self.inner.call(worker_id, *args)


@pytest.mark.parametrize("transport", ["grpc", "collective"])
@pytest.mark.parametrize("model", ["tiny-moge", "qwen3-moe"])
def test_disaggregated_cluster_matches_single_process(ray_local, transport, model, request):
    source = "preset:tiny-moge" if model == "tiny-moge" else request.getfixturevalue("qwen3_checkpoint")
    config = make_config(source, transport, None if model == "tiny-moge" else 4)
    cfg = model_config_of(model_spec(config))
    assert cfg.n_groups == 4
    reference_engine, ref_loaded = build_engine(config)
    batch = prompts(cfg.vocab_size)
    reference = generate([reference_engine], batch)

    plane = ReplicaWorkers(config, namespace=f"dp-{uuid.uuid4().hex[:8]}")
    every = worker_ids(4)
    refs = plane.start(pack_groups(cfg.n_groups, every))
    try:
        # each worker asked Ray for one fractional CPU slot and got exactly that, no accelerator
        for ref in refs.values():
            info = ray.get(ref.handle.device_info.remote())
            assert info["assigned_resources"] == {"CPU": WORKER_CPUS}
            assert info["device"] == "cpu"

        for d, n_replicas in [(1, 1), (2, 2), (4, 2)]:
            placement = pack_groups(cfg.n_groups, every[:d])
            for w, ref in refs.items():  # move groups to match this placement
                keep = list(placement.groups_of(w)) if w in placement.workers else []
                ray.get(ref.handle.drop_groups.remote([g for g in range(cfg.n_groups) if g not in keep]))
                ray.get(ref.handle.load_groups.remote(keep))
            for w, ref in refs.items():
                stats = ray.get(ref.handle.stats.remote())
                held = list(placement.groups_of(w)) if w in placement.workers else []
                assert stats["held_groups"] == held
                assert stats["bytes_held"] == len(held) * group_bytes(cfg)
            replicas = [replica(config, cfg, placement, refs, plane, ping_pong=(i == 0)) for i in range(n_replicas)]
            try:
                got = generate([e for e, _ in replicas], batch)
            finally:
                for _, remote in replicas:
                    remote.close()
            assert got == reference, f"D={d}, replicas={n_replicas}"
            if cfg.family == "moge":
                assert all(v == 0.0 for v in replicas[0][1].metrics()["imbalance"].values())

        # a worker killed mid-step: the step retries on its replacement, every request completes
        placement = pack_groups(cfg.n_groups, every[:2])
        for w in every[:2]:
            ray.get(refs[w].handle.load_groups.remote(list(placement.groups_of(w))))
        engine, remote = replica(config, cfg, placement, refs, plane, ping_pong=True)
        killer = KillOnCall(remote.carrier, "w1", refs["w1"].handle, n=cfg.num_layers + 2)
        remote.carrier = killer
        try:
            got = generate([engine], batch)
        finally:
            remote.close()
        assert killer.killed_pid is not None and remote.retries >= 1
        assert got == reference
        new_pid = ray.get(plane.fleet.handle("w1").device_info.remote())["pid"]
        assert new_pid != killer.killed_pid
    finally:
        plane.stop(every)
