"""The torch.distributed rendezvous (collective pair, step lane, group copy) admits only a peer that
holds the cluster secret: a joiner reaching the TCPStore port without it gets nothing."""

import datetime

import pytest
import torch
import torch.distributed as dist

from actors.experts.group_copy import CopyFailed, GroupCopyServer, allocate_groups, copy_groups
from actors.experts.carriers import rendezvous_auth
from actors.experts.carriers.base import WorkerRef
from actors.experts.carriers.collective import CollectiveCarrier
from actors.experts.carriers.pairs import make_group
from actors.experts.carriers.rendezvous_auth import RendezvousRefused, prove
from actors.experts.worker.worker import ExpertWorker
from actors.model.presets import get_preset

CFG = get_preset("tiny-moge")
SPEC = {"source": "preset:tiny-moge", "dtype": "float32", "device": "cpu", "seed": 0}
CPU = torch.device("cpu")
SECRET = "the-cluster-secret"


@pytest.fixture(autouse=True)
def process_secret(monkeypatch):
    """Workers install their secret for the whole process; give each test a clean slate."""
    monkeypatch.setattr(rendezvous_auth, "_process_secret", None)


def _routing(t: int = 3):
    eg = CFG.experts_per_group
    ids = torch.stack([torch.arange(t) % eg + k * eg for k in range(CFG.n_groups)], 1)
    return torch.randn(t, CFG.hidden_size), ids, torch.full(ids.shape, 0.25)


def _intrude(address: dict, prefix: str, secret: str | None) -> None:
    """What anyone reaching the port can do: read the store's keys and join `prefix` as rank 0."""
    store = dist.TCPStore(address["host"], int(address["port"]), is_master=False,
                          timeout=datetime.timedelta(seconds=20))
    pg = make_group("gloo", dist.PrefixStore(prefix, store), 0, datetime.timedelta(seconds=20))
    prove(pg, 0, "cpu", datetime.timedelta(seconds=20), secret)


@pytest.mark.parametrize("joiner", [None, "wrong-secret", SECRET[:-1]])
def test_collective_pair_refuses_a_replica_without_the_secret(joiner):
    worker = ExpertWorker("a", SPEC, "collective", {"host": "127.0.0.1", "auth_token": SECRET})
    worker.load_groups([0, 1])
    rendezvous_auth.set_process_secret(None)  # the joiner's process has no (or another) secret
    ref = WorkerRef("a", endpoint=worker.endpoint(), local=worker)
    bad = CollectiveCarrier(timeout_s=10, auth_token=joiner)
    try:
        with pytest.raises(RendezvousRefused):
            bad.connect(ref)
        assert bad.connected() == []
        good = CollectiveCarrier(timeout_s=20, auth_token=SECRET)  # the same worker still serves
        try:
            good.connect(ref)
            x, ids, w = _routing()
            assert good.call("a", 0, [0], x, ids, w).result(timeout=20).shape == (1, 3, CFG.hidden_size)
        finally:
            good.close()
    finally:
        bad.close()
        worker.shutdown()


def test_step_lane_refuses_a_joiner_without_the_secret():
    worker = ExpertWorker("a", SPEC, "inprocess", {"host": "127.0.0.1", "auth_token": SECRET})
    try:
        info = worker.accept_lane("r/a/s0/x", "gloo")
        with pytest.raises(RendezvousRefused):
            _intrude(info, "r/a/s0/x", "wrong-secret")
        lane = worker._lanes._lanes["r/a/s0/x"]
        lane.thread.join(20)
        assert not lane.thread.is_alive() and lane.steps == 0  # the worker side ended the lane
    finally:
        worker.shutdown()


def test_group_copy_refuses_a_target_without_the_secret_and_serves_one_with_it():
    src = allocate_groups(CFG, [0], torch.float32, CPU)
    for t in (*src[0].w13.values(), *src[0].w2.values()):
        t.normal_()  # allocate_groups leaves them uninitialised (NaNs would never compare equal)
    server = GroupCopyServer(lambda: src, CPU, secret=SECRET)
    try:
        with pytest.raises(CopyFailed, match="cluster secret"):
            copy_groups(server.address(), CFG, [0], torch.float32, CPU, timeout_s=20)
        assert server.copies_served == 0
        got, _ = copy_groups(server.address(), CFG, [0], torch.float32, CPU, timeout_s=20, secret=SECRET)
        assert torch.equal(got[0].w13[0], src[0].w13[0])
    finally:
        server.stop()
