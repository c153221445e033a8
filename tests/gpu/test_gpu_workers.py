"""Expert workers on real GPUs: each sees exactly its own device; the disaggregated engine matches
the single-process one over gRPC (any GPU count) and NCCL (two GPUs or more). Skips without CUDA.

    python -m pytest tests/gpu/test_gpu_workers.py -q
"""

from __future__ import annotations

import uuid

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
PROMPTS = [[(5 * i + j) % 250 for j in range(n)] for i, n in enumerate([1, 7, 19, 3])]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    from cluster.cli.local_cluster import start_ray

    start_ray(num_cpus=8)
    yield
    ray.shutdown()


def gpu_config(transport: str, num_workers: int, worker_gpus: float):
    from cluster.config import MogeConfig

    return MogeConfig.load(
        env={},
        model={"source": "preset:tiny-moge", "device": "cuda", "dtype": "float32", "max_model_len": 128},
        engine={"num_kv_blocks": 64, "max_num_seqs": 8},
        data_plane={"transport": transport, "num_workers": num_workers, "worker_num_gpus": worker_gpus,
                    "worker_num_cpus": 1, "ping_pong": False, "call_timeout_s": 60},
    )


def greedy(engine) -> dict[str, list[int]]:
    from actors.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    return engine.run_to_completion(max_steps=100)


def run_replica(config_dict: dict, namespace: str) -> dict:
    """A replica as Ray actor task with its own GPU: reference tokens, then disaggregated tokens."""
    from cluster.replica.assemble import build_engine
    from cluster.config import MogeConfig
    from cluster.replica.workers import ReplicaWorkers
    from cluster.replica.assemble import assemble

    config = MogeConfig.model_validate(config_dict)
    reference = greedy(build_engine(config)[0])
    parts = assemble(config, workers=ReplicaWorkers(config, namespace=namespace))
    engine, remote = parts.engine, parts.experts
    try:
        return {"reference": reference, "remote": greedy(engine), "metrics": remote.metrics()}
    finally:
        remote.close()


def test_each_worker_sees_only_its_own_gpu(ray_gpu):
    import ray

    from cluster.replica.workers import ReplicaWorkers, worker_ids

    n = min(N_GPUS, 4)
    whole = n >= 2
    config = gpu_config("grpc", n if whole else 2, 1 if whole else 0.5)
    plane = ReplicaWorkers(config, namespace=f"gpu-{uuid.uuid4().hex[:6]}")
    ids = worker_ids(config.data_plane.num_workers)
    try:
        infos = [ray.get(plane.fleet.start(w).device_info.remote()) for w in ids]
        for info in infos:
            assert info["device"] == "cuda:0" and info["device_count"] == 1
            assert info["visible_devices_env"] == "CUDA_VISIBLE_DEVICES"
            assert len(info["visible_devices"].split(",")) == 1
            assert info["assigned_resources"].get("GPU") == config.data_plane.worker_num_gpus
        if whole:  # whole GPUs: no two workers share one
            assert len({i["visible_devices"] for i in infos}) == len(infos)
    finally:
        plane.stop(ids)


@pytest.mark.parametrize("transport", ["grpc", "collective"])
def test_disaggregated_matches_single_process_on_gpu(ray_gpu, transport):
    import ray

    from cluster.replica.workers import ReplicaWorkers, worker_ids

    if transport == "collective" and N_GPUS < 2:
        pytest.skip("NCCL needs the replica and the worker on different GPUs")
    workers = max(1, min(N_GPUS - 1, 4)) if N_GPUS >= 2 else 2
    config = gpu_config(transport, workers, 1 if N_GPUS >= 2 else 0.25)
    namespace = f"gpu-{uuid.uuid4().hex[:6]}"
    replica_gpus = 1 if N_GPUS >= 2 else 0.25
    try:
        got = ray.get(ray.remote(num_gpus=replica_gpus)(run_replica).remote(config.model_dump(mode="json"), namespace),
                      timeout=600)
    finally:
        ReplicaWorkers(config, namespace=namespace).stop(worker_ids(workers))
    assert got["remote"] == got["reference"]
    assert all(v == 0.0 for v in got["metrics"]["imbalance"].values())
