"""The step lane over gloo with in-process workers (the lane threads run in this process): per-layer
results equal LocalExperts' bit for bit (per-group partials added in group order, whatever the
placement), a lane that dies mid-step re-runs its groups elsewhere."""

from dataclasses import replace

import pytest
import torch

from actors.experts.placement import pack_groups
from actors.experts.carriers.base import StepHeader, WorkerRef
from actors.experts.carriers.inprocess import InProcessCarrier
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.lane.step_lane import LaneCarrier
from actors.experts.lane.wire import OP_STEP, bucket, header, new_packet, parse_header
from actors.experts.worker.worker import ExpertWorker
from actors.model.local_experts import LocalExperts
from actors.model.presets import get_preset
from actors.weights.loader import random_expert_groups

MOGE = get_preset("tiny-moge")
TOPK = replace(MOGE, family="mixtral", top_k=3, router_scale=False, renormalize=True)
SPEC = {"source": "preset:tiny-moge", "dtype": "float32", "device": "cpu", "seed": 0}


def lane_experts(cfg, d, replacer=None):
    ids_ = [f"w{i}" for i in range(d)]
    placement = pack_groups(cfg.n_groups, ids_)
    workers = {}
    for w in ids_:
        worker = ExpertWorker(w, SPEC, transport_options={"host": "127.0.0.1"})
        worker.cfg = cfg
        worker.load_groups(list(placement.groups_of(w)))
        workers[w] = worker
    refs = {w: WorkerRef(w, local=workers[w]) for w in ids_}
    sx = Dispatcher(cfg, InProcessCarrier(), placement, refs, replacer=replacer,
                    step_carrier=LaneCarrier("cpu", timeout_s=20))
    return sx, workers


def routing(cfg, t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, cfg.hidden_size, generator=g)
    if cfg.family == "moge":
        eg = cfg.experts_per_group
        ids = torch.stack([torch.randint(0, eg, (t,), generator=g) + grp * eg for grp in range(cfg.n_groups)], 1)
    else:
        ids = torch.stack([torch.randperm(cfg.n_experts, generator=g)[: cfg.top_k] for _ in range(t)])
    return x, ids, torch.rand(ids.shape, generator=g)


def moe_layers(cfg):
    return [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]


def test_packet_round_trips_and_buckets():
    p = new_packet(8, 6, 3, torch.bfloat16, "cpu")
    x, ids, w = torch.randn(5, 6).bfloat16(), torch.tensor([[1, -1, 7]] * 5), torch.rand(5, 3)
    p.fill(x, ids, w)
    assert torch.equal(p.x[:5], x) and torch.equal(p.ids[:5], ids.int()) and torch.equal(p.weights[:5], w)
    assert (p.ids[5:] == -1).all() and (p.weights[5:] == 0).all()
    assert [bucket(t) for t in (1, 2, 3, 65, 256, 257, 700)] == [1, 2, 4, 128, 256, 512, 768]
    h = StepHeader(7, 3, (5, 2), (8, 2), torch.bfloat16, 6, 3, (0, 2, 61, 62, 300), False)
    assert parse_header(header(OP_STEP, h)) == (OP_STEP, h)


@pytest.mark.parametrize("cfg", [MOGE, TOPK], ids=["moge", "topk"])
@pytest.mark.parametrize("d", [1, 2, 6])
def test_a_step_matches_local_experts(cfg, d):
    sx, workers = lane_experts(cfg, d)
    local = LocalExperts(cfg, random_expert_groups(cfg, range(cfg.n_groups), 0))
    for step, t in enumerate([1, 7, 33]):
        sx.on_step_boundary()
        for layer in moe_layers(cfg):
            x, ids, w = routing(cfg, t, seed=10 * step + layer)
            got, want = sx.dispatch(layer, x, ids, w).wait(), local.dispatch(layer, x, ids, w).wait()
            if d <= cfg.n_groups:
                assert torch.equal(got, want)  # per-group partials, added in group order: one process's bits
            else:  # groups replicated: rows split between holders (fewer rows per matmul)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(w.lane_stats()["steps"] for w in workers.values()) == 3 * d
    sx.close()


def test_an_unannounced_second_micro_batch_goes_per_call():
    """Two micro-batches nobody announced (begin_step): the first takes the lanes, the second,
    dispatched while the first's step is open, the per-call carrier; both exact."""
    sx, workers = lane_experts(MOGE, 2)
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(MOGE.n_groups), 0))
    sx.on_step_boundary()
    inputs = {(mb, layer): routing(MOGE, 3 + 2 * mb, seed=7 * mb + layer)
              for mb in (0, 1) for layer in moe_layers(MOGE)}
    for layer in moe_layers(MOGE):
        pending = [sx.dispatch(layer, *inputs[(mb, layer)]) for mb in (0, 1)]
        for mb, p in enumerate(pending):
            assert torch.equal(p.wait(), local.dispatch(layer, *inputs[(mb, layer)]).wait())
    assert sum(w.lane_stats()["steps"] for w in workers.values()) == 2  # one step header per worker
    assert sum(w.stats()["calls"] for w in workers.values()) > 2  # the second went per call
    sx.close()


@pytest.mark.parametrize("cfg", [MOGE, TOPK], ids=["moge", "topk"])
def test_announced_micro_batches_share_one_lane_in_dispatch_order(cfg):
    """Ping-pong as PingPongRunner drives it: begin_step announces both micro-batches, so each
    worker gets ONE header and one lane carries A0 B0 A1 B1 ... (no second communicator)."""
    sx, workers = lane_experts(cfg, 2)
    local = LocalExperts(cfg, random_expert_groups(cfg, range(cfg.n_groups), 0))
    for step in range(2):
        sx.on_step_boundary()
        counts = [3, 5 + step]
        sx.begin_step(counts)
        inputs = {(mb, layer): routing(cfg, counts[mb], seed=7 * mb + layer + 100 * step)
                  for mb in (0, 1) for layer in moe_layers(cfg)}
        for layer in moe_layers(cfg):
            pending = [sx.dispatch(layer, *inputs[(mb, layer)]) for mb in (0, 1)]
            for mb, p in enumerate(pending):
                assert torch.equal(p.wait(), local.dispatch(layer, *inputs[(mb, layer)]).wait())
    assert [w.lane_stats()["lanes"] for w in workers.values()] == [1, 1]  # one lane per worker
    assert sum(w.lane_stats()["steps"] for w in workers.values()) == 2 * 2  # one header per worker per step
    with pytest.raises(RuntimeError, match="announced"):
        sx.on_step_boundary()
        sx.begin_step([2, 2])
        sx.dispatch(moe_layers(cfg)[0], *routing(cfg, 3, seed=0))
    sx.close()


def test_graph_hooks_decline_what_cannot_be_captured():
    """gloo lanes (CPU) are never captured: graph_prepare says no and nothing is announced."""
    sx, _ = lane_experts(MOGE, 1)
    sx.on_step_boundary()
    assert not sx.graph_safe  # CPU
    assert sx.graph_prepare(4, [4]) is False and sx.per_step._announced is None
    assert sx.graph_begin(4) is False  # no plan: the caller runs the bucket eagerly
    sx.close()


def test_a_lane_dying_mid_step_reruns_its_groups_on_the_replacement(monkeypatch):
    from actors.model.group_compute import GroupCompute

    spare, doomed = {}, {}
    partials = GroupCompute.partials

    def dying(self, *args, **kw):
        if doomed.get("compute") is self:  # w1's lane thread dies like a killed worker
            raise ConnectionError("worker died")
        return partials(self, *args, **kw)

    monkeypatch.setattr(GroupCompute, "partials", dying)

    def replacer(worker_id, groups, failed=None):
        worker = ExpertWorker(worker_id, SPEC, transport_options={"host": "127.0.0.1"})
        worker.load_groups(list(groups))
        spare[worker_id] = worker
        return WorkerRef(worker_id, local=worker)

    sx, workers = lane_experts(MOGE, 2, replacer=replacer)
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(MOGE.n_groups), 0))
    layers = moe_layers(MOGE)
    for step in range(2):
        sx.on_step_boundary()
        for i, layer in enumerate(layers):
            if step == 0 and i == 1:
                doomed["compute"] = workers["w1"].holding()  # dies receiving layer 1
            x, ids, w = routing(MOGE, 5, seed=layer)
            assert torch.equal(sx.dispatch(layer, x, ids, w).wait(), local.dispatch(layer, x, ids, w).wait())
    assert sx.per_step.link_failures == 1 and "w1" in spare  # marked down: its groups went to the replacement
    assert spare["w1"].lane_stats()["steps"] == 1  # the next step runs over a lane to the replacement
    sx.close()

