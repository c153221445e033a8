"""gRPC (per call and the per-step stream) and collective (gloo) carriers on loopback, worker and
replica in this process; the gRPC gate."""

from dataclasses import replace

import pytest
import torch

from actors.experts.worker.worker import ExpertWorker
from actors.model.local_experts import LocalExperts
from actors.weights.loader import random_expert_groups
from actors.experts.placement import pack_groups
from actors.model.presets import get_preset
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.carriers.base import TransportError, WorkerRef
from actors.experts.carriers.factory import make_carrier
from tests.unit.test_remote_experts import routing

CFG = get_preset("tiny-moge")
SPEC = {"source": "preset:tiny-moge", "dtype": "float32", "device": "cpu", "seed": 0}
OPTS = {"host": "127.0.0.1"}


def moge_routing(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    eg = CFG.experts_per_group
    ids = torch.stack([torch.randint(0, eg, (t,), generator=g) + k * eg for k in range(CFG.n_groups)], 1)
    return torch.randn(t, CFG.hidden_size, generator=g), ids, torch.rand(ids.shape, generator=g)


@pytest.fixture(params=["grpc", "collective"])
def kind(request):
    return request.param


def test_remote_experts_over_transport_match_local(kind):
    workers = {w: ExpertWorker(w, SPEC, kind, OPTS) for w in ("a", "b")}
    placement = pack_groups(4, list(workers))
    for w, worker in workers.items():
        worker.load_groups(list(placement.groups_of(w)))
    refs = {w: WorkerRef(w, endpoint=worker.endpoint(), local=worker) for w, worker in workers.items()}
    rx = Dispatcher(CFG, make_carrier(kind, timeout_s=20), placement, refs)
    local = LocalExperts(CFG, random_expert_groups(CFG, range(4), 0))
    try:
        for layer, t in [(0, 1), (2, 17)]:
            x, ids, w = moge_routing(t, layer)
            assert torch.equal(rx.dispatch(layer, x, ids, w).wait(), local.dispatch(layer, x, ids, w).wait())
        # a call for a group the worker lacks is an error from the worker, not a hang
        x, ids, w = moge_routing(3)
        with pytest.raises(Exception, match="does not hold"):
            rx.carrier.call("a", 0, [3], x, ids, w).result(timeout=20)
        # the link survives a worker-side error
        assert rx.carrier.call("a", 0, [0], x, ids, w).result(timeout=20).shape == (1, 3, CFG.hidden_size)
        # disconnecting one worker leaves the other's path intact
        rx.carrier.disconnect("a")
        with pytest.raises(TransportError):
            rx.carrier.call("a", 0, [0], x, ids, w).result(timeout=20)
        assert rx.carrier.call("b", 0, [2], x, ids, w).result(timeout=20).shape == (1, 3, CFG.hidden_size)
        rx.carrier.connect(refs["a"])
        assert rx.carrier.call("a", 0, [1], x, ids, w).result(timeout=20).shape == (1, 3, CFG.hidden_size)
    finally:
        rx.close()
        for worker in workers.values():
            worker.shutdown()


def test_grpc_peer_export_moves_exact_tensors():
    from actors.experts.carriers.grpc_call import fetch_groups, worker_stats

    holder = ExpertWorker("h", SPEC, "grpc", OPTS)
    try:
        holder.load_groups([1])
        got = fetch_groups(holder.endpoint(), [1])
        want = holder.export_groups([1])[1]
        assert got[1]["first_expert"] == want["first_expert"] == 4
        assert set(got[1]["w13"]) == set(want["w13"])
        assert all(torch.equal(got[1]["w13"][l], want["w13"][l]) for l in want["w13"])
        assert all(torch.equal(got[1]["w2"][l], want["w2"][l]) for l in want["w2"])
        assert worker_stats(holder.endpoint())["held_groups"] == [1]
    finally:
        holder.shutdown()


def test_grpc_unreachable_worker_fails_fast_with_transport_error():
    t = make_carrier("grpc", timeout_s=2)
    t.connect(WorkerRef("gone", endpoint={"host": "127.0.0.1", "port": 1, "tls": False}))
    x, ids, w = moge_routing(2)
    with pytest.raises(TransportError):
        t.call("gone", 0, [0], x, ids, w).result(timeout=10)
    t.close()


def test_grpc_with_tls(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=moge-worker", "-addext", "subjectAltName=DNS:moge-worker,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    worker = ExpertWorker("t", SPEC, "grpc", {**OPTS, "tls_cert": str(cert), "tls_key": str(key)})
    try:
        worker.load_groups([0])
        assert worker.endpoint()["tls"] is True
        x, ids, w = moge_routing(4)
        plain = make_carrier("grpc", timeout_s=5)  # no CA: the handshake must fail, not fall back
        plain.connect(WorkerRef("t", endpoint={**worker.endpoint(), "tls": False}))
        with pytest.raises(TransportError):
            plain.call("t", 0, [0], x, ids, w).result(timeout=10)
        secure = make_carrier("grpc", timeout_s=20, tls_ca=str(cert))
        secure.connect(WorkerRef("t", endpoint=worker.endpoint()))
        y = secure.call("t", 0, [0], x, ids, w).result(timeout=20)
        assert torch.equal(y, worker.compute(0, [0], x, ids, w))
        plain.close(), secure.close()
    finally:
        worker.shutdown()


@pytest.mark.parametrize("cfg", [CFG, replace(CFG, family="mixtral", top_k=3, router_scale=False, renormalize=True)],
                         ids=["moge", "topk"])
def test_the_grpc_step_stream_matches_local_experts_bit_for_bit(cfg):
    """One stream per worker carries whole steps (ping-pong's two micro-batches included); the
    per-group partials add in group order: LocalExperts' bits."""
    from actors.experts.carriers.grpc_stream import GrpcStreamCarrier
    from actors.experts.dispatch.dispatcher import Dispatcher

    workers = {w: ExpertWorker(w, SPEC, "grpc", OPTS) for w in ("a", "b")}
    placement = pack_groups(4, list(workers))
    for w, worker in workers.items():
        worker.cfg = cfg
        worker.load_groups(list(placement.groups_of(w)))
    refs = {w: WorkerRef(w, endpoint=worker.endpoint(), local=worker) for w, worker in workers.items()}
    per_call = make_carrier("grpc", timeout_s=20)
    rx = Dispatcher(cfg, per_call, placement, refs, step_carrier=GrpcStreamCarrier(per_call))
    local = LocalExperts(cfg, random_expert_groups(cfg, range(4), 0))
    layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]
    try:
        for step, counts in enumerate([[3], [2, 5]]):
            rx.on_step_boundary()
            rx.begin_step(counts)
            inputs = {(mb, layer): routing(cfg, t, 10 * step + layer) for mb, t in enumerate(counts) for layer in layers}
            for layer in layers:
                pending = [rx.dispatch(layer, *inputs[(mb, layer)]) for mb in range(len(counts))]
                for mb, p in enumerate(pending):
                    assert torch.equal(p.wait(), local.dispatch(layer, *inputs[(mb, layer)]).wait())
        assert rx.metrics()["link_failures"] == 0
        # every layer of both steps went over the streams: one compute per layer and micro-batch
        assert all(worker.stats()["calls"] == 3 * len(layers) for worker in workers.values())
    finally:
        rx.close()
        for worker in workers.values():
            worker.shutdown()


def test_the_gate_limits_calls_in_flight_per_peer_before_reading_them():
    import threading

    import grpc

    from actors.experts.carriers.grpc_server import GrpcExpertServer
    from actors.experts.carriers.grpc_wire import auth_metadata, tensor_to_proto
    from protos import moge_expert_pb2 as pb
    from protos import moge_expert_pb2_grpc as pb_grpc

    release, entered = threading.Event(), threading.Event()

    class Slow:
        worker_id, device = "slow", torch.device("cpu")

        def compute(self, *args, **kw):
            entered.set()
            release.wait(20)
            return torch.zeros(1, 2, CFG.hidden_size)

    server = GrpcExpertServer(Slow(), "127.0.0.1", {"auth_token": "s", "max_inflight_per_peer": 1})
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    x, ids, w = moge_routing(2)
    req = pb.ComputeRequest(layer=0, group_ids=[0], x=tensor_to_proto(x), ids=tensor_to_proto(ids),
                            weights=tensor_to_proto(w))
    stub = pb_grpc.ExpertDataStub(channel)
    try:
        first = stub.Compute.future(req, timeout=20, metadata=auth_metadata("s"))
        assert entered.wait(20)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compute(req, timeout=20, metadata=auth_metadata("s"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert first.result(timeout=20).y.shape == [1, 2, CFG.hidden_size]
        assert stub.Compute(req, timeout=20, metadata=auth_metadata("s")).y.shape == [1, 2, CFG.hidden_size]
    finally:
        release.set()
        channel.close()
        server.stop()
