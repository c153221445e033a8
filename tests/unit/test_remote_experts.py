"""The Dispatcher per call over the in-process carrier: exact combine, placements, epochs, failover."""

from dataclasses import replace

import pytest
import torch

from actors.experts.worker.worker import ExpertWorker
from actors.model.local_experts import LocalExperts
from actors.weights.loader import random_expert_groups
from actors.experts.placement import Placement, pack_groups
from actors.model.presets import get_preset
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.dispatch.failover import ExpertCallFailed
from actors.experts.carriers.base import WorkerRef
from actors.experts.carriers.inprocess import InProcessCarrier

MOGE = get_preset("tiny-moge")
TOPK = replace(MOGE, family="mixtral", top_k=3, router_scale=False, renormalize=True)
SPEC = {"source": "preset:tiny-moge", "dtype": "float32", "device": "cpu", "seed": 0}


class FlakyWorker(ExpertWorker):
    """A worker that can be 'killed': every compute after that raises."""

    dead = False

    def compute(self, *args):
        if self.dead:
            raise ConnectionError(f"{self.worker_id} is gone")
        return super().compute(*args)


def make_workers(cfg, ids):
    out = {}
    for w in ids:
        worker = FlakyWorker(w, SPEC)
        worker.cfg = cfg  # same groups/experts layout as the preset, routing family may differ
        out[w] = worker
    return out


def routing(cfg, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, cfg.hidden_size, generator=g)
    if cfg.family == "moge":  # one expert per group per token, like moge_route
        eg = cfg.experts_per_group
        ids = torch.stack([torch.randint(0, eg, (t,), generator=g) + grp * eg for grp in range(cfg.n_groups)], 1)
    else:
        ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[: cfg.top_k] for _ in range(t)])
    w = torch.rand(ids.shape, generator=g)
    return x, ids, w


def remote(cfg, placement, workers, **kw):
    for w in placement.workers:
        workers[w].load_groups(list(placement.groups_of(w)))
    refs = {w: WorkerRef(w, local=workers[w]) for w in workers}
    return Dispatcher(cfg, InProcessCarrier(), placement, refs, **kw)


@pytest.mark.parametrize("cfg", [MOGE, TOPK], ids=["moge", "topk"])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_matches_local_experts_bit_for_bit(cfg, d):
    ids_ = [f"w{i}" for i in range(d)]
    rx = remote(cfg, pack_groups(cfg.n_groups, ids_), make_workers(cfg, ids_))
    local = LocalExperts(cfg, random_expert_groups(cfg, range(cfg.n_groups), 0))
    for layer, t in [(0, 1), (1, 7), (3, 33)]:
        x, ids, w = routing(cfg, t, seed=layer)
        assert torch.equal(rx.dispatch(layer, x, ids, w).wait(), local.dispatch(layer, x, ids, w).wait())
    rx.close()


def test_replicated_groups_split_tokens_among_holders():
    ids_ = [f"w{i}" for i in range(6)]  # 4 groups on 6 workers: groups 0, 1 on two holders each
    workers = make_workers(MOGE, ids_)
    rx = remote(MOGE, pack_groups(4, ids_), workers)
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(4), 0))
    x, ids, w = routing(MOGE, 20)
    torch.testing.assert_close(rx.dispatch(2, x, ids, w).wait(), local.dispatch(2, x, ids, w).wait())
    tokens = {wid: workers[wid].stats()["tokens"] for wid in ids_}
    assert tokens == {"w0": 10, "w1": 10, "w2": 20, "w3": 20, "w4": 10, "w5": 10}


def test_group_load_counts_and_imbalance():
    rx = remote(TOPK, pack_groups(4, ["a", "b"]), make_workers(TOPK, ["a", "b"]))
    x, ids, w = routing(TOPK, 16)
    rx.dispatch(1, x, ids, w).wait()
    m = rx.metrics()
    expect = [int(((ids // 4) == g).any(1).sum()) for g in range(4)]
    assert m["group_tokens"][1] == expect and m["tokens"][1] == 16
    assert m["imbalance"][1] == pytest.approx((max(expect) - min(expect)) / 16)
    moge = remote(MOGE, pack_groups(4, ["a"]), make_workers(MOGE, ["a"]))
    moge.dispatch(0, *routing(MOGE, 9)).wait()
    assert moge.metrics()["imbalance"][0] == 0.0


def test_failed_worker_retries_on_other_holder_within_the_step():
    ids_ = ["a", "b", "c", "d", "e", "f", "g", "h"]  # every group on two workers
    workers = make_workers(MOGE, ids_)
    rx = remote(MOGE, pack_groups(4, ids_), workers)
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(4), 0))
    workers["b"].dead = True
    x, ids, w = routing(MOGE, 10)
    torch.testing.assert_close(rx.dispatch(0, x, ids, w).wait(), local.dispatch(0, x, ids, w).wait())
    assert rx.retries >= 1 and rx.metrics()["down"] == ["b"]
    before = workers["b"].stats()["calls"]
    rx.dispatch(1, x, ids, w).wait()  # the next layer avoids the failed worker
    assert workers["b"].stats()["calls"] == before


def test_sole_holder_failure_uses_the_replacement():
    workers = make_workers(MOGE, ["a", "b"])
    replaced = []

    def replacer(worker_id, groups, failed=None):
        fresh = FlakyWorker(worker_id, SPEC)
        fresh.load_groups(list(groups))
        replaced.append((worker_id, groups))
        return WorkerRef(worker_id, local=fresh)

    rx = remote(MOGE, pack_groups(4, ["a", "b"]), workers, replacer=replacer)
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(4), 0))
    workers["a"].dead = True
    x, ids, w = routing(MOGE, 5)
    assert torch.equal(rx.dispatch(0, x, ids, w).wait(), local.dispatch(0, x, ids, w).wait())
    assert replaced == [("a", (0, 1))]


def test_a_staged_epoch_rescues_a_step_waiting_for_a_replacement():
    """A lost node with no free device: the replacement waits, the controller's repair publishes
    an epoch holding the group elsewhere, and the waiting step finishes on that holder."""
    import threading

    workers = make_workers(MOGE, ["a", "b"])
    entered, release = threading.Event(), threading.Event()

    def replacer(worker_id, groups, failed=None):  # no device free: blocks until the test lets it fail
        entered.set()
        release.wait(30)
        raise RuntimeError("no device for a replacement")

    rx = remote(MOGE, pack_groups(4, ["a"]), workers, replacer=replacer)
    workers["b"].load_groups([0, 1, 2, 3])
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(4), 0))
    workers["a"].dead = True
    x, ids, w = routing(MOGE, 6)

    def repair() -> None:
        assert entered.wait(30)
        rx.adopt(Placement(1, (("b",),) * 4), {"b": WorkerRef("b", local=workers["b"])})

    threading.Thread(target=repair, daemon=True).start()
    try:
        assert torch.equal(rx.dispatch(0, x, ids, w).wait(), local.dispatch(0, x, ids, w).wait())
    finally:
        release.set()
    assert rx.epoch == 0 and workers["b"].stats()["calls"] >= 1  # epoch switches only at the boundary
    assert rx.on_step_boundary() == 1


def test_no_replacer_and_no_holder_is_a_clear_error():
    workers = make_workers(MOGE, ["a"])
    rx = remote(MOGE, pack_groups(4, ["a"]), workers, max_attempts=2)
    workers["a"].dead = True
    with pytest.raises(ExpertCallFailed, match="no replacer"):
        rx.dispatch(0, *routing(MOGE, 3)).wait()


def test_adopt_takes_effect_only_at_the_step_boundary():
    workers = make_workers(MOGE, ["a", "b"])
    rx = remote(MOGE, pack_groups(4, ["a"]), workers)
    workers["b"].load_groups([0, 1, 2, 3])
    new = Placement(1, (("b",), ("b",), ("b",), ("b",)))
    rx.adopt(new, {"b": WorkerRef("b", local=workers["b"])})
    rx.dispatch(0, *routing(MOGE, 4)).wait()
    assert rx.epoch == 0 and workers["b"].stats()["calls"] == 0  # still the old epoch mid-step
    assert rx.on_step_boundary() == 1
    rx.dispatch(0, *routing(MOGE, 4)).wait()
    assert workers["b"].stats()["calls"] == 1 and rx.carrier.connected() == ["b"]


def test_the_route_table_maps_groups_to_live_holder_slots_on_the_device():
    from actors.experts.dispatch.route_table import RouteTable

    p = Placement(3, (("a",), ("a", "b"), ("c",), ("c",)))
    route = RouteTable(MOGE, p, usable={"a", "b"})  # c is down
    assert route.slots == ["a", "b"] and route.unrouted == [2, 3] and route.split
    assert route.groups_of == [(0, 1), (1,)]
    x, ids, w = routing(MOGE, 4)
    slot_of = route.slot_of(ids)  # [T, K]
    group_of = ids // MOGE.experts_per_group
    assert (slot_of[group_of == 0] == 0).all() and (slot_of[group_of >= 2] == -1).all()
    # group 1's rows split between a (rows 0, 1) and b (rows 2, 3)
    assert slot_of[:, 1].tolist() == [0, 0, 1, 1]
    masked = route.masked(ids, slot_of, 1)
    assert (masked[:, [0, 2, 3]] == -1).all() and masked[2:, 1].tolist() == ids[2:, 1].tolist()
    whole = RouteTable(MOGE, pack_groups(4, ["a"]), usable={"a"})
    assert whole.whole and whole.masked(ids, None, 0) is ids
