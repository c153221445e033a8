"""The migration state machine against a fake cluster that checks invariant 3 on every drop."""

from __future__ import annotations

import pytest

from cluster.elastic.migration import MigrationRunner, Operation, Phase, validate_map
from cluster.elastic.store import EpochConflict


class FakeWorld:
    """Workers holding groups, a placement store, and attention replicas that adopt epochs."""

    def __init__(self, holdings: dict[str, set[int]], groups: dict[int, tuple[str, ...]], replicas=2):
        self.holdings = {w: set(gs) for w, gs in holdings.items()}
        self.epoch = 0
        self.maps = {0: dict(groups)}
        self.replica_epoch = {f"r{i}": 0 for i in range(replicas)}
        self.events: list[tuple] = []
        self.journaled: list[Phase] = []
        self.fail_load: set[str] = set()
        self.acks_work = True
        self.ack_only: set[int] = set()  # when set, only these epochs are acknowledged
        self.publish_raises_after_write = False
        self.current_raises = False
        self.stopped: list[str] = []

    # ports
    def load(self, worker, groups, peers):
        self.events.append(("load", worker, tuple(groups), dict(peers)))
        if worker in self.fail_load:
            self.holdings.setdefault(worker, set()).add(groups[0])  # a partial copy, then death
            raise RuntimeError(f"{worker} died while loading")
        for g, peer in peers.items():
            assert peer is None or g in self.holdings[peer], "copied from a peer that lacks the group"
        self.holdings.setdefault(worker, set()).update(groups)

    def drop(self, worker, groups):
        self.events.append(("drop", worker, tuple(groups)))
        for g in groups:
            for rid, e in self.replica_epoch.items():
                assert worker not in self.maps[e].get(g, ()), (
                    f"invariant 3: {worker} dropped group {g} still used by {rid} at epoch {e}")
        self.holdings[worker] -= set(groups)

    def publish(self, groups, expected_epoch):
        if expected_epoch != self.epoch:
            raise EpochConflict("conflict")
        for g, holders in groups.items():
            for w in holders:
                assert g in self.holdings.get(w, ()), f"published {w} for group {g} before it loaded"
        self.epoch += 1
        self.maps[self.epoch] = dict(groups)
        self.events.append(("publish", self.epoch))
        if self.publish_raises_after_write:
            self.publish_raises_after_write = False
            raise ConnectionError("reply lost")
        return self.epoch

    def current(self):
        if self.current_raises:
            raise ConnectionError("redis down")
        return self.epoch, dict(self.maps[self.epoch])

    def wait_acks(self, epoch, timeout_s):
        if not self.acks_work or (self.ack_only and epoch not in self.ack_only):
            return False
        for rid in self.replica_epoch:
            self.replica_epoch[rid] = max(self.replica_epoch[rid], epoch)
        self.events.append(("acked", epoch))
        return True

    def stop_worker(self, worker):
        self.stopped.append(worker)
        self.holdings.pop(worker, None)

    def journal(self, op):
        if not self.journaled or self.journaled[-1] != op.phase:
            self.journaled.append(op.phase)
        self.last_journal = op.to_dict()


def kinds(events):
    return [e[0] for e in events]


@pytest.fixture
def world():
    return FakeWorld({"w0": {0, 1, 2, 3}, "w1": set()}, {g: ("w0",) for g in range(4)})


def move_op(world, new):
    return Operation("migrate", world.epoch, dict(world.maps[world.epoch]), new)


def test_move_loads_publishes_acks_then_drops(world):
    new = {0: ("w0",), 1: ("w0",), 2: ("w1",), 3: ("w1",)}
    op = MigrationRunner(world).run(move_op(world, new))
    assert op.phase == Phase.DONE and op.new_epoch == 1
    assert kinds(world.events) == ["load", "publish", "acked", "drop"]
    assert world.events[0] == ("load", "w1", (2, 3), {2: "w0", 3: "w0"})  # peer-to-peer from w0
    assert world.holdings == {"w0": {0, 1}, "w1": {2, 3}}
    assert world.journaled == [Phase.PLANNED, Phase.LOADING, Phase.PUBLISHING, Phase.PUBLISHED,
                               Phase.DROPPING, Phase.DONE]


def test_replication_keeps_old_holder(world):
    new = {g: ("w0", "w1") for g in range(4)}
    op = MigrationRunner(world).run(move_op(world, new))
    assert op.phase == Phase.DONE
    assert world.holdings == {"w0": {0, 1, 2, 3}, "w1": {0, 1, 2, 3}}
    assert "drop" not in kinds(world.events)


def test_target_killed_while_loading_rolls_back_without_publishing(world):
    world.fail_load.add("w1")
    op = Operation("scale", 0, dict(world.maps[0]), {0: ("w0",), 1: ("w1",), 2: ("w0",), 3: ("w1",)},
                   added_workers=["w1"])
    op = MigrationRunner(world).run(op)
    assert op.phase == Phase.ROLLED_BACK and "died while loading" in op.error
    assert world.epoch == 0 and "publish" not in kinds(world.events)
    assert world.holdings["w0"] == {0, 1, 2, 3}
    assert world.stopped == ["w1"]


def test_missing_acknowledgement_republishes_old_map_before_dropping_new_copies(world):
    world.ack_only = {2}  # e+1 is never acknowledged, the rollback epoch is
    new = {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)}
    op = MigrationRunner(world, ack_timeout_s=0).run(move_op(world, new))
    assert op.phase == Phase.ROLLED_BACK and op.rollback_epoch == 2
    assert world.maps[2] == world.maps[0]  # the old map, as a newer epoch
    assert kinds(world.events) == ["load", "publish", "publish", "acked", "drop"]
    assert world.events[-1] == ("drop", "w1", (0,))
    assert world.holdings["w0"] == {0, 1, 2, 3}


def test_unacknowledged_rollback_leaves_copies_rather_than_risking_a_replica(world):
    world.acks_work = False
    new = {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)}
    op = MigrationRunner(world, ack_timeout_s=0).run(move_op(world, new))
    assert op.phase == Phase.ROLLED_BACK
    assert "drop" not in kinds(world.events)
    assert world.holdings == {"w0": {0, 1, 2, 3}, "w1": {0}}


def test_epoch_conflict_rolls_back(world):
    op = move_op(world, {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)})
    world.epoch = 5  # another controller wrote meanwhile
    world.maps[5] = dict(world.maps[0])
    op = MigrationRunner(world).run(op)
    assert op.phase == Phase.ROLLED_BACK and "EpochConflict" in op.error
    assert world.holdings["w1"] == set()


def test_publish_whose_reply_was_lost_is_settled_from_the_store(world):
    world.publish_raises_after_write = True
    op = MigrationRunner(world).run(move_op(world, {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)}))
    assert op.phase == Phase.DONE and op.new_epoch == 1
    assert world.holdings == {"w0": {1, 2, 3}, "w1": {0}}


def test_resume_after_restart_mid_load_rolls_back(world):
    op = move_op(world, {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)})
    op.phase = Phase.LOADING
    world.holdings["w1"] = {0}  # the load had got somewhere
    restored = Operation.from_dict(op.to_dict())
    restored = MigrationRunner(world).resume(restored)
    assert restored.phase == Phase.ROLLED_BACK and world.epoch == 0
    assert world.holdings["w1"] == set()


def test_resume_after_restart_once_published_finishes(world):
    op = move_op(world, {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)})
    world.holdings["w1"] = {0}
    op.new_epoch = world.publish(op.new_groups, 0)
    op.phase = Phase.PUBLISHED
    restored = MigrationRunner(world).resume(Operation.from_dict(op.to_dict()))
    assert restored.phase == Phase.DONE
    assert world.holdings == {"w0": {1, 2, 3}, "w1": {0}}


def test_rollback_blocked_by_store_outage_is_journaled_and_resumable(world):
    world.publish_raises_after_write = False
    op = move_op(world, {0: ("w1",), 1: ("w0",), 2: ("w0",), 3: ("w0",)})
    world.acks_work = False
    world.current_raises = True
    with pytest.raises(ConnectionError):
        MigrationRunner(world, ack_timeout_s=0).run(op)
    assert world.last_journal["phase"] == "rolling_back"
    world.current_raises = False
    world.acks_work = True
    done = MigrationRunner(world).resume(Operation.from_dict(world.last_journal))
    assert done.phase == Phase.ROLLED_BACK
    assert world.maps[world.epoch] == world.maps[0] and world.holdings["w1"] == set()


def test_drain_stops_retired_worker_after_acknowledgement():
    world = FakeWorld({"w0": {0, 1}, "w1": {2, 3}}, {0: ("w0",), 1: ("w0",), 2: ("w1",), 3: ("w1",)})
    op = Operation("scale", 0, dict(world.maps[0]), {g: ("w0",) for g in range(4)}, retired_workers=["w1"])
    op = MigrationRunner(world).run(op)
    assert op.phase == Phase.DONE and world.stopped == ["w1"]
    assert kinds(world.events) == ["load", "publish", "acked"]
    assert world.holdings == {"w0": {0, 1, 2, 3}}


def test_gains_losses_and_validation():
    op = Operation("migrate", 3, {0: ("a",), 1: ("a", "b")}, {0: ("b",), 1: ("b",)})
    assert op.gains() == {"b": [0]} and op.losses() == {"a": [0, 1]}
    assert op.peers_for("b", [0]) == {0: "a"}
    assert op.peers_for("b", [0], alive={"b"}) == {0: None}  # no live peer: from the checkpoint
    validate_map({0: ("a",), 1: ("b",)}, 2)
    with pytest.raises(ValueError, match="missing"):
        validate_map({0: ("a",), 1: ()}, 2)
