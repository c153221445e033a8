"""The device inventory against an in-memory store and fleet: worker states are the enum the docs
name, and the bookkeeping an operation relies on (devices, fresh ids, settling) holds."""

from __future__ import annotations

import re

import pytest

import cluster.elastic.inventory as inventory_module
from actors.experts.placement import pack_groups
from cluster.elastic.inventory import Inventory, WorkerState, worker_order
from cluster.elastic.migration import Operation, Phase
from cluster.elastic.store import WorkerRecord


class FakeStore:
    def __init__(self):
        self.recs: dict[str, WorkerRecord] = {}
        self.p = None

    def workers(self):
        return {w: WorkerRecord(**vars(r)) for w, r in self.recs.items()}  # copies, like Redis

    def put_worker(self, rec):
        self.recs[rec.worker_id] = WorkerRecord(**vars(rec))

    def remove_worker(self, wid):
        self.recs.pop(wid, None)

    def placement(self):
        return self.p


class FakeFleet:
    def __init__(self, fail=()):
        self.up: set[str] = set()
        self.fail = set(fail)

    def start(self, wid):
        if wid in self.fail:
            raise RuntimeError("no device")
        self.up.add(wid)

    def handle(self, wid):
        raise ValueError("no actor in a unit test")

    def alive(self, wid):
        return wid in self.up

    def running(self):
        return sorted(self.up)


@pytest.fixture
def inv():
    return Inventory(FakeStore(), FakeFleet(fail={"w9"}), clock=lambda: 123.0)


def test_documented_states_are_the_enum():
    documented = set(re.findall(r"^  ([A-Z]+)  ", inventory_module.__doc__, re.M))
    assert documented == {s.name for s in WorkerState}
    assert WorkerRecord("w0", "a").state == WorkerState.STARTING.value


def test_start_records_then_forgets_a_worker_that_cannot_start(inv):
    fresh = []
    inv.on_start = fresh.append
    inv.start_worker("w0")
    assert inv.store.recs["w0"].state == "starting" and inv.store.recs["w0"].created_at == 123.0
    assert fresh == ["w0"]
    with pytest.raises(RuntimeError):
        inv.start_worker("w9")
    assert "w9" not in inv.store.recs and "w9" not in inv.known_workers and fresh == ["w0"]


def test_devices_standby_and_next_ids(inv):
    inv.store.p = pack_groups(4, ["w0", "w1"])
    for wid, state in [("w2", WorkerState.SERVING), ("w10", WorkerState.STANDBY), ("w3", WorkerState.DRAINING)]:
        inv.set_state(wid, state)
    assert inv.devices() == ["w0", "w1", "w2"]  # placement + serving, in numeric order
    assert inv.standby() == ["w10"] and inv.standby(alive_only=True) == []
    assert inv.next_ids(2) == ["w11", "w12"]
    assert sorted(["w10", "w9", "x", "w2"], key=worker_order) == ["w2", "w9", "w10", "x"]


@pytest.mark.parametrize("phase", [Phase.DONE, Phase.ROLLED_BACK])
def test_settle_after_an_operation(inv, phase):
    for wid in ("w0", "w1", "w2"):
        inv.set_state(wid, WorkerState.SERVING)
    inv.set_state("w3", WorkerState.STARTING)
    op = Operation("scale", 0, {0: ("w0",)}, {0: ("w3",)}, added_workers=["w3"], retired_workers=["w2"])
    op.phase = phase
    inv.settle(op)
    if phase == Phase.DONE:
        assert inv.store.recs["w3"].state == "serving" and "w2" not in inv.store.recs
    else:
        assert "w3" not in inv.store.recs and inv.store.recs["w2"].state == "serving"


def test_a_worker_answering_from_a_new_process_gets_its_live_pid_on_record(inv):
    inv.start_worker("w0")
    inv.store.recs["w0"].info = {"device": "cpu", "pid": 111, "node_id": "n", "resources": None}
    inv.note_pids({"w0": 111})
    assert inv.store.recs["w0"].info["pid"] == 111 and inv.store.recs["w0"].info["device"] == "cpu"
    inv.note_pids({"w0": 222, "gone": 5})  # replaced under its id; an unknown id is ignored
    assert inv.store.recs["w0"].info["pid"] == 222 and inv.known_workers["w0"].info["pid"] == 222
    assert inv.store.recs["w0"].state == "starting" and "gone" not in inv.store.recs
