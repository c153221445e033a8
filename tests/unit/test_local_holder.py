"""Groups held in the attention replica's own process ("local" holder) next to expert workers,
and the device lane (gloo on CPU) that moves groups between holders."""

import threading

import pytest
import torch

from actors.experts.group_copy import CopyFailed, GroupCopyServer, allocate_groups, copy_groups
from actors.experts.group_sources import NoSource, chain_of, fetch_groups
from actors.experts.local_holder import LOCAL, LocalHolder
from actors.experts.placement import Placement
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.carriers.base import WorkerRef
from actors.experts.carriers.inprocess import InProcessCarrier
from actors.experts.worker.worker import ExpertWorker
from actors.model.local_experts import LocalExperts
from actors.model.presets import get_preset
from actors.weights.loader import random_expert_groups

CFG = get_preset("tiny-moge")
SPEC = {"source": "preset:tiny-moge", "dtype": "float32", "device": "cpu", "seed": 0}
CPU = torch.device("cpu")


def identity_groups(groups):
    """Weights that spell out where every element belongs: group, layer, tensor, position."""
    out = allocate_groups(CFG, list(groups), torch.float32, CPU)
    for g, w in out.items():
        for k, tensors in enumerate((w.w13, w.w2)):
            for layer, t in tensors.items():
                t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t) + 1e6 * g + 1e5 * layer + 5e4 * k)
    return out


def routing(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, CFG.hidden_size, generator=g)
    eg = CFG.experts_per_group
    ids = torch.stack([torch.randint(0, eg, (t,), generator=g) + grp * eg for grp in range(CFG.n_groups)], 1)
    return x, ids, torch.rand(ids.shape, generator=g)


def test_device_lane_moves_the_exact_bytes_into_fresh_buffers():
    src = identity_groups(range(CFG.n_groups))
    server = GroupCopyServer(lambda: src, CPU)
    try:
        got, info = copy_groups(server.address(), CFG, [3, 1], torch.float32, CPU, timeout_s=20)
        assert sorted(got) == [1, 3] and info["bytes"] == sum(src[g].nbytes for g in (1, 3))
        for g in (1, 3):
            assert got[g].first_expert == src[g].first_expert
            for name in ("w13", "w2"):
                for layer, t in getattr(src[g], name).items():
                    mine = getattr(got[g], name)[layer]
                    assert torch.equal(mine, t) and mine.data_ptr() != t.data_ptr()
    finally:
        server.stop()


def test_device_lane_refuses_what_the_holder_lacks_and_times_out_on_silence():
    server = GroupCopyServer(lambda: identity_groups([0]), CPU)
    try:
        with pytest.raises(CopyFailed, match="not held"):
            copy_groups(server.address(), CFG, [2], torch.float32, CPU, timeout_s=20)
        with pytest.raises(CopyFailed, match="holder lane is nccl"):
            copy_groups({**server.address(), "backend": "nccl"}, CFG, [0], torch.float32, CPU)
    finally:
        server.stop()
    hung = threading.Event()
    silent = GroupCopyServer(lambda: hung.wait() or {}, CPU)  # accepts, never answers
    try:
        with pytest.raises(CopyFailed):
            copy_groups(silent.address(), CFG, [0], torch.float32, CPU, timeout_s=1.0)
    finally:
        hung.set()
        silent.stop()


def test_source_chain_falls_through_in_order():
    assert chain_of("device") == ("device", "object_store", "checkpoint")
    assert chain_of("peer") == ("object_store", "checkpoint")
    calls = []

    def ckpt(groups):
        calls.append(groups)
        return random_expert_groups(CFG, groups, 0)

    loaded, source, attempts = fetch_groups([1], chain_of("device"), CFG, torch.float32, CPU, ckpt,
                                            peer_copy=None, peer_handle=None, timeout_s=1)
    assert source == "checkpoint" and calls == [[1]]
    assert [a["source"] for a in attempts] == ["device", "object_store", "checkpoint"]
    assert "error" in attempts[0] and "error" in attempts[1] and "error" not in attempts[2]
    with pytest.raises(NoSource):
        fetch_groups([1], ("device",), CFG, torch.float32, CPU, ckpt, timeout_s=1)


def test_mixed_local_and_remote_matches_local_experts_bit_for_bit_across_epochs():
    all_groups = random_expert_groups(CFG, range(CFG.n_groups), 0)
    reference = LocalExperts(CFG, random_expert_groups(CFG, range(CFG.n_groups), 0))
    holder = LocalHolder(CFG, CPU, torch.float32, dict(all_groups))
    worker = ExpertWorker("w0", SPEC)
    rx = Dispatcher(CFG, InProcessCarrier(), Placement(0, ((LOCAL,),) * CFG.n_groups),
                       {"w0": WorkerRef("w0", local=worker)}, local=holder)

    def check(seed):
        for layer, t in [(0, 1), (2, 9)]:
            x, ids, w = routing(t, seed + layer)
            assert torch.equal(rx.dispatch(layer, x, ids, w).wait(), reference.dispatch(layer, x, ids, w).wait())

    check(0)
    # 1 -> 2: the worker copies groups 2, 3 from the replica over the device lane, then the epoch moves
    out = worker.load_groups([2, 3], chain=["device"], peer_copy=holder.copy_endpoint())
    assert out["source"] == "device" and out["groups"] == [2, 3]
    split = Placement(1, ((LOCAL,), (LOCAL,), ("w0",), ("w0",)))
    holder.stage({0, 1}, {})
    rx.adopt(split)
    check(10)  # still epoch 0 until the boundary
    assert rx.on_step_boundary() == 1 and holder.groups == (0, 1)
    check(20)
    assert worker.stats()["calls"] > 0
    # 2 -> 1: the replica takes 2, 3 back from the worker, then the worker drops them
    arrived, info = copy_groups(worker.endpoint()["copy"], CFG, [2, 3], torch.float32, CPU, timeout_s=20)
    holder.stage(set(range(CFG.n_groups)), arrived)
    rx.adopt(Placement(2, ((LOCAL,),) * CFG.n_groups))
    assert rx.on_step_boundary() == 2 and holder.groups == (0, 1, 2, 3)
    worker.drop_groups([2, 3])
    calls = worker.stats()["calls"]
    check(30)
    assert worker.stats()["calls"] == calls  # nothing remote any more
    rx.close()
    worker.shutdown()
