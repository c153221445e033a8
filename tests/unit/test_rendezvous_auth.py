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


def _listen_address(port: int) -> str:
    """The local address a listening TCP socket on `port` is bound to (from /proc/net/tcp[6])."""
    import ipaddress

    for path, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(path) as f:
            for line in f.readlines()[1:]:
                local, _, state = line.split()[1:4]
                addr, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:  # LISTEN
                    raw = bytes.fromhex(addr)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per 32-bit word, little endian
                    return str(ipaddress.ip_address(raw))
    raise AssertionError(f"nothing listens on {port}")


def test_group_copy_store_listens_on_its_host_and_survives_a_plain_client(monkeypatch):
    """A plain TCPStore client (anyone reaching the port) gets no copy: garbage, an unsigned request
    and a ticket it never fills change nothing; a signed copy afterwards is served."""
    import json

    import actors.experts.group_copy as group_copy

    monkeypatch.setattr(group_copy, "SKIP_TICKET_S", 0.3)
    src = allocate_groups(CFG, [0], torch.float32, CPU)
    for t in (*src[0].w13.values(), *src[0].w2.values()):
        t.normal_()
    server = GroupCopyServer(lambda: src, CPU, host="127.0.0.1", secret=SECRET)
    try:
        address = server.address()
        assert _listen_address(address["port"]) == "127.0.0.1"  # not every interface
        plain = dist.TCPStore(address["host"], address["port"], is_master=False, timeout=datetime.timedelta(seconds=10))
        for value in (b"not json", b"\xff\x00", b"[]", json.dumps({"body": 5}).encode(),
                      json.dumps({"body": json.dumps({"copy_id": "copy-forged", "manifest": []}), "tag": "00"}).encode()):
            plain.set(f"req/{plain.add('seq', 1)}", value)
        plain.add("seq", 1)  # a ticket taken and never filled
        plain.wait(["resp/copy-forged"], datetime.timedelta(seconds=10))
        assert plain.get("resp/copy-forged").startswith(b"error")  # told, given nothing
        got, _ = copy_groups(address, CFG, [0], torch.float32, CPU, timeout_s=20, secret=SECRET)
        assert torch.equal(got[0].w13[0], src[0].w13[0])
        assert server.copies_served == 1 and server.requests_refused == 5
    finally:
        server.stop()
