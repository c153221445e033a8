"""A hung (not dead) expert worker: the Dispatcher waits one deadline derived from recent call
latency (fixed when the call was sent, from latencies taken when replies arrived), then computes the
worker's groups itself from the checkpoint (same tokens), asks for a replacement in the background,
goes back to the worker once it is replaced, and never waits on a worker already marked down."""

from __future__ import annotations

import threading
import time

import torch

from actors.experts.placement import pack_groups
from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.carriers.base import WorkerRef
from actors.experts.carriers.inprocess import InProcessCarrier
from actors.experts.worker.worker import ExpertWorker
from actors.model.local_experts import LocalExperts
from actors.weights.loader import random_expert_groups
from tests.unit.test_remote_experts import MOGE, SPEC, routing

WAIT_S = 30


class HangableWorker(ExpertWorker):
    """compute blocks while `hung` is set (SIGSTOP), counting the calls that got stuck."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.resume = threading.Event()
        self.resume.set()
        self.stuck = 0

    def compute(self, *args):
        if not self.resume.is_set():
            self.stuck += 1
            self.resume.wait(WAIT_S)
        return super().compute(*args)


def build(replacer=None, **kw):
    ids = ["w0", "w1"]
    placement = pack_groups(MOGE.n_groups, ids)
    workers = {w: HangableWorker(w, SPEC) for w in ids}
    for w in ids:
        workers[w].load_groups(list(placement.groups_of(w)))
    refs = {w: WorkerRef(w, local=workers[w]) for w in ids}
    fallback = ExpertWorker("replica-fallback", SPEC)
    rx = Dispatcher(MOGE, InProcessCarrier(), placement, refs, replacer=replacer, local_fallback=fallback,
                       wait_timeout_s=WAIT_S, min_deadline_s=0.3, **kw)
    return rx, workers, fallback


def test_a_hung_worker_costs_one_deadline_then_its_groups_are_computed_locally_with_the_same_result():
    rx, workers, fallback = build()
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(MOGE.n_groups), 0))
    try:
        for layer in range(10):  # warm: the deadline learns the call latency
            x, ids, w = routing(MOGE, 5, seed=layer)
            assert torch.equal(rx.dispatch(1, x, ids, w).wait(), local.dispatch(1, x, ids, w).wait())
        assert rx.call_deadline_s() < 2
        workers["w1"].resume.clear()  # SIGSTOP
        timings = []
        for step in range(5):
            x, ids, w = routing(MOGE, 7, seed=100 + step)
            t0 = time.monotonic()
            got = rx.dispatch(1, x, ids, w).wait()
            timings.append(time.monotonic() - t0)
            assert torch.equal(got, local.dispatch(1, x, ids, w).wait())
        assert timings[0] < rx.call_deadline_s() + 1.5  # one deadline (plus the local group load)
        assert max(timings[1:]) < 0.5  # afterwards: no waiting on the hung worker at all
        assert workers["w1"].stuck == 1 and rx.local_calls >= 5
        assert sorted(fallback.held_groups()) == list(rx.placement.groups_of("w1"))
        assert rx.groups_without_live_holder() == list(rx.placement.groups_of("w1"))
    finally:
        workers["w1"].resume.set()
        rx.close()


def test_the_replacement_runs_in_the_background_and_the_worker_is_used_again():
    replaced = threading.Event()
    box = {}

    def replacer(worker_id, groups, failed=None):
        box["worker"].resume.set()  # the controller / replacement brought it back
        replaced.set()
        return WorkerRef(worker_id, local=box["worker"])

    rx, workers, _ = build(replacer=replacer)
    box["worker"] = workers["w1"]
    try:
        for layer in range(10):
            x, ids, w = routing(MOGE, 5, seed=layer)
            rx.dispatch(1, x, ids, w).wait()
        workers["w1"].resume.clear()
        x, ids, w = routing(MOGE, 5, seed=7)
        rx.dispatch(1, x, ids, w).wait()
        assert replaced.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while rx.groups_without_live_holder() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.groups_without_live_holder() == []
        before = workers["w1"].stats()["calls"]
        rx.dispatch(1, x, ids, w).wait()
        assert workers["w1"].stats()["calls"] == before + 1
    finally:
        workers["w1"].resume.set()
        rx.close()


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_latency_is_taken_when_the_reply_arrives_and_the_deadline_when_the_call_is_sent():
    """A step thread held up after sending (the other micro-batch, a failover) neither stretches the
    recorded latency nor the call's deadline."""
    clock = FakeClock()
    rx, workers, _ = build(clock=clock)
    try:
        x, ids, w = routing(MOGE, 5, seed=1)
        pending = rx.dispatch(1, x, ids, w)
        for call in pending.calls:
            call.future.result(timeout=WAIT_S)  # the replies are in
        clock.t += 5.0  # only then does the step thread come back
        pending.wait()
        assert list(rx.liveness._latencies) == [0.0, 0.0]  # one per worker, taken at arrival
        workers["w1"].resume.clear()  # SIGSTOP
        pending = rx.dispatch(1, x, ids, w)
        clock.t += 2 * WAIT_S  # past any deadline of a call sent before
        t0 = time.monotonic()
        pending.wait()
        assert time.monotonic() - t0 < WAIT_S / 2  # the deadline was fixed at send: no wait left
        assert rx.liveness.is_down("w1")
    finally:
        workers["w1"].resume.set()
        rx.close()


def test_a_second_micro_batch_does_not_wait_for_a_worker_already_marked_down():
    rx, workers, _ = build(warm_fallback=True)
    local = LocalExperts(MOGE, random_expert_groups(MOGE, range(MOGE.n_groups), 0))
    try:
        for layer in range(10):
            rx.dispatch(1, *routing(MOGE, 5, seed=layer)).wait()
        workers["w1"].resume.clear()
        inputs = [routing(MOGE, 5, seed=20), routing(MOGE, 3, seed=21)]
        a, b = (rx.dispatch(1, *inp) for inp in inputs)  # ping-pong: both in flight to the hung worker
        t0 = time.monotonic()
        got_a = a.wait()
        t1 = time.monotonic()
        got_b = b.wait()
        t2 = time.monotonic()
        assert t1 - t0 < rx.call_deadline_s() + 0.5  # one deadline, the warm fallback then answers
        assert t2 - t1 < 0.3  # nothing more for B
        assert torch.equal(got_a, local.dispatch(1, *inputs[0]).wait())
        assert torch.equal(got_b, local.dispatch(1, *inputs[1]).wait())
        assert workers["w1"].stuck == 2  # both calls reached it before it was marked down
    finally:
        workers["w1"].resume.set()
        rx.close()
