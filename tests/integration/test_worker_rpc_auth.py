"""Expert-worker RPC is authenticated and bounded, on a real Ray worker actor over loopback gRPC.

A plain client built from protos/ (what an attacker on the network has) gets UNAUTHENTICATED on
every RPC without the cluster secret or with a wrong one, ExportGroups and the step stream
included, before the worker reads the request's body: an unauthenticated 200 MB Compute leaves the
worker's memory as it was. With the secret, duplicate or unheld group ids and out-of-bounds calls
are refused before any compute. The secret reached the worker through Ray: it is on neither its
command line nor in its environment.

    PYTHONPATH=. timeout 600 python -m pytest -q tests/integration/test_worker_rpc_auth.py
"""

from __future__ import annotations

import grpc
import pytest
import ray

from actors.experts.carriers.grpc_wire import AUTH_METADATA, tensor_to_proto
from cluster.config import MogeConfig
from cluster.elastic.worker_fleet import WorkerFleet
from cluster.security import cluster_secret
from protos import moge_expert_pb2 as pb
from protos import moge_expert_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

WORKER = "auth-w0"


@pytest.fixture(scope="module")
def worker(ray_local):
    config = MogeConfig.load(env={}, model={"source": "preset:tiny-moge", "device": "cpu", "dtype": "float32"},
                             data_plane={"transport": "grpc", "worker_num_cpus": 0.25, "advertise_host": "127.0.0.1"})
    fleet = WorkerFleet(config, "moge-auth-test")
    handle = fleet.start(WORKER)
    try:
        ray.get(handle.load_groups.remote([0, 1]), timeout=120)
        endpoint = ray.get(handle.endpoint.remote(), timeout=30)
        info = ray.get(handle.device_info.remote(), timeout=30)
        yield endpoint, info["pid"], config
    finally:
        fleet.stop(WORKER)


def compute_request(cfg, groups=(0,), tokens=2, hidden=None) -> pb.ComputeRequest:
    import torch

    hidden = hidden or cfg.hidden_size
    ids = torch.full((tokens, cfg.top_k), -1, dtype=torch.long)  # MoGE calls carry every slot
    ids[:, 0] = 0  # group 0's first expert
    return pb.ComputeRequest(
        layer=_moe_layer(cfg), group_ids=list(groups), x=tensor_to_proto(torch.zeros(tokens, hidden)),
        ids=tensor_to_proto(ids), weights=tensor_to_proto(torch.ones(tokens, cfg.top_k)))


def _moe_layer(cfg) -> int:
    return next(layer for layer in range(cfg.num_layers) if layer not in cfg.dense_layers)


def calls(cfg):
    """Every RPC of both services, as (name, invoke(stub_data, stub_control, metadata))."""
    return [
        ("Compute", lambda d, c, md: d.Compute(compute_request(cfg), timeout=10, metadata=md)),
        ("Ping", lambda d, c, md: c.Ping(pb.PingRequest(), timeout=10, metadata=md)),
        ("Stats", lambda d, c, md: c.Stats(pb.StatsRequest(), timeout=10, metadata=md)),
        ("ExportGroups", lambda d, c, md: list(c.ExportGroups(pb.ExportRequest(groups=[0]), timeout=10, metadata=md))),
        ("Steps", lambda d, c, md: list(d.Steps(iter([pb.StepMessage(start=pb.StepStart(groups=[0], n_layers=1)),
                                                       pb.StepMessage(layer=pb.LayerInput(layer=_moe_layer(cfg),
                                                                                          x=compute_request(cfg).x,
                                                                                          ids=compute_request(cfg).ids,
                                                                                          weights=compute_request(cfg).weights))]),
                                                timeout=10, metadata=md))),
    ]


def stubs(endpoint):
    channel = grpc.insecure_channel(f"{endpoint['host']}:{endpoint['port']}")
    return channel, pb_grpc.ExpertDataStub(channel), pb_grpc.WorkerControlStub(channel)


def test_every_rpc_without_the_secret_is_unauthenticated(worker):
    from actors.model.presets import get_preset

    endpoint, _, _ = worker
    cfg = get_preset("tiny-moge")
    channel, data, control = stubs(endpoint)
    secret = cluster_secret.ensure()
    try:
        for name, invoke in calls(cfg):
            for md in (None, ((AUTH_METADATA, "wrong"),), ((AUTH_METADATA, secret[:-1]),)):
                with pytest.raises(grpc.RpcError) as info:
                    invoke(data, control, md)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, md)
            invoke(data, control, ((AUTH_METADATA, secret),))  # and with it, it works
    finally:
        channel.close()


@pytest.mark.parametrize("case", ["duplicate-groups", "unheld-group", "too-many-tokens", "wrong-hidden",
                                  "export-duplicates"])
def test_out_of_bounds_calls_are_refused_before_compute(worker, case):
    from actors.model.presets import get_preset

    endpoint, _, _ = worker
    cfg = get_preset("tiny-moge")
    md = ((AUTH_METADATA, cluster_secret.ensure()),)
    channel, data, control = stubs(endpoint)
    invoke = {
        "duplicate-groups": lambda: data.Compute(compute_request(cfg, groups=[0] * 1000), timeout=10, metadata=md),
        "unheld-group": lambda: data.Compute(compute_request(cfg, groups=[3]), timeout=10, metadata=md),
        "too-many-tokens": lambda: data.Compute(compute_request(cfg, tokens=70_000), timeout=30, metadata=md),
        "wrong-hidden": lambda: data.Compute(compute_request(cfg, hidden=cfg.hidden_size + 1), timeout=10, metadata=md),
        "export-duplicates": lambda: list(control.ExportGroups(pb.ExportRequest(groups=[0] * 1000), timeout=10, metadata=md)),
    }[case]
    try:
        with pytest.raises(grpc.RpcError) as info:
            invoke()
        expected = grpc.StatusCode.FAILED_PRECONDITION if case == "unheld-group" else grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.code() == expected
    finally:
        channel.close()


def test_the_secret_travels_through_ray_not_the_command_line_or_environment(worker):
    from pathlib import Path

    _, pid, _ = worker
    secret = cluster_secret.ensure().encode()
    assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert secret not in Path(f"/proc/{pid}/environ").read_bytes()


def _rss(pid: int) -> int:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_an_unauthenticated_200mb_compute_is_refused_before_its_body_is_read(worker):
    """The gate answers from the call's headers; gRPC would otherwise take the whole message in
    (up to the 256 MiB limit, on each of the server's threads) before a unary handler refuses it."""
    import threading

    from actors.model.presets import get_preset

    endpoint, pid, _ = worker
    cfg = get_preset("tiny-moge")
    size = 200 << 20
    rows = size // 4 // cfg.hidden_size
    big = pb.ComputeRequest(layer=_moe_layer(cfg), group_ids=[0], ids=compute_request(cfg).ids,
                            x=pb.Tensor(dtype="float32", shape=[rows, cfg.hidden_size], data=bytes(rows * cfg.hidden_size * 4)))
    channel = grpc.insecure_channel(f"{endpoint['host']}:{endpoint['port']}",
                                    options=[("grpc.max_send_message_length", 300 << 20)])
    before = _rss(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(_rss(pid))
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for md in (None, ((AUTH_METADATA, "wrong"),)):
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.ExpertDataStub(channel).Compute(big, timeout=60, metadata=md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        done.set()
        sampler.join(10)
        channel.close()
    peak.append(_rss(pid))
    print(f"worker RSS before {before >> 20} MiB, peak during two refused 200 MB calls {max(peak) >> 20} MiB")
    assert max(peak) - before < 50 << 20
