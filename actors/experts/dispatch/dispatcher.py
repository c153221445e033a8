"""The Dispatcher: an attention replica's ExpertCompute when (some of) its routed experts live on
expert workers. It owns the placement epochs, turns each into a route table (route_table.py),
switches epochs at the step boundary, and owns liveness (liveness.py), failover and retry
(failover.py) — for every carrier. Carriers (carriers/, lane/) only move bytes.

    per call   one call per holder and layer over the per-call carrier (per_call.py)
    per step   one header per step and one message per layer over a StepCarrier — the step lane
               or the gRPC stream — with the per-call carrier kept for failover (per_step.py)

Whatever the path, a layer's result is the per-group partials added in ascending group order in
float32 (combine.py), the arithmetic of one process, so with no group replicated every placement
and carrier gives the single-process model's bits.

Invariant 2: `adopt(placement)` only stages a placement (connecting new workers, off the step
path); `on_step_boundary()` makes it current. Invariant 4: a failed call is re-sent, per group, to
another holder, a staged holder, the local fallback or a replacement, inside the same step.

Shape legend: T = tokens of the layer, D = hidden, K = slots per token.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from actors.experts.carriers.base import Carrier, StepCarrier, WorkerRef
from actors.experts.dispatch.failover import Failover, LocalFallback, Replacer
from actors.experts.dispatch.liveness import Liveness
from actors.experts.dispatch.per_call import PerCallPath, Sent
from actors.experts.dispatch.per_step import StepPath
from actors.experts.dispatch.route_table import RouteTable
from actors.experts.group_load import GroupLoad
from actors.experts.local_holder import LOCAL, LocalHolder
from actors.experts.placement import Placement
from actors.model.config import ModelConfig
from actors.model.expert_compute import ExpertCompute, PendingExperts


class Dispatcher(ExpertCompute):
    def __init__(
        self,
        cfg: ModelConfig,
        carrier: Carrier,
        placement: Placement,
        workers: dict[str, WorkerRef],
        replacer: Replacer | None = None,
        step_carrier: StepCarrier | None = None,
        local: LocalHolder | None = None,
        local_fallback: Any = None,
        warm_fallback: bool = False,
        max_attempts: int = 3,
        wait_timeout_s: float = 60.0,
        restage_poll_s: float = 0.05,
        min_deadline_s: float = 1.5,
        deadline_factor: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if placement.n_groups != cfg.n_groups:
            raise ValueError(f"placement has {placement.n_groups} groups, the model {cfg.n_groups}")
        if step_carrier is not None and local is not None:
            # a step link reaches a worker; groups held in this process have none (config.py refuses)
            raise ValueError("a per-step carrier does not serve replica-local groups (elastic.local_groups)")
        self.cfg = cfg
        self.carrier = carrier
        self.local = local  # groups this replica computes in process (holder id LOCAL)
        self.liveness = Liveness(min_deadline_s, deadline_factor, wait_timeout_s, clock)
        if local_fallback is not None and not isinstance(local_fallback, LocalFallback):
            # an in-process ExpertWorker (loading groups from the checkpoint): warm = every group now
            local_fallback = LocalFallback(local_fallback, cfg.n_groups, warm_fallback, wait_timeout_s)
        self.failover = Failover(self, replacer, local_fallback, max_attempts, restage_poll_s)
        self.load = GroupLoad(cfg.n_groups)
        self.per_call = PerCallPath(self)
        self.per_step = StepPath(self, step_carrier) if step_carrier is not None else None
        if step_carrier is not None:
            step_carrier.report_latency = lambda worker_id, seconds: self.liveness.record(seconds)
        self.graph_carrier = self.per_step is not None
        self._placement = placement
        self._staged: tuple[Placement, dict[str, WorkerRef]] | None = None
        self.workers = dict(workers)  # may name workers of later epochs too (tests stage them)
        self._route: RouteTable | None = None
        self._lock = threading.Lock()
        for worker_id in _remote(placement.workers):
            self.carrier.connect(self.workers[worker_id])

    # ---- placement epochs (invariant 2) ------------------------------------------------------------

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def epoch(self) -> int:
        return self._placement.epoch

    def adopt(self, placement: Placement, workers: dict[str, WorkerRef] | None = None) -> None:
        """Stage `placement`; new workers are connected now, off the step path. It becomes current
        at the next on_step_boundary()."""
        if placement.n_groups != self.cfg.n_groups:
            raise ValueError(f"placement has {placement.n_groups} groups, the model {self.cfg.n_groups}")
        refs = {**self.workers, **(workers or {})}
        missing = [w for w in _remote(placement.workers) if w not in refs]
        if missing:
            raise ValueError(f"placement epoch {placement.epoch} names unknown workers {missing}")
        if LOCAL in placement.workers and self.local is None:
            raise ValueError(f"placement epoch {placement.epoch} holds groups locally but this replica has no LocalHolder")
        for worker_id in _remote(placement.workers):
            if worker_id not in self.carrier.connected() or (workers and worker_id in workers):
                self.carrier.connect(refs[worker_id])
        with self._lock:
            self._staged = (placement, refs)

    def staged_placement(self) -> Placement | None:
        with self._lock:
            return self._staged[0] if self._staged is not None else None

    def on_step_boundary(self) -> int:
        """Make a staged placement current; -> the epoch in force (what this replica acknowledges)."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            placement, refs = staged
            unused = set(self._placement.workers) - set(placement.workers)
            self._placement = placement
            self.workers = {w: refs[w] for w in _remote(placement.workers)}
            self.liveness.keep_only(placement.workers)
            self._route = None
            if self.local is not None:
                self.local.commit()  # the groups this epoch holds in process (staged by the listener)
            for worker_id in _remote(unused):
                self.carrier.disconnect(worker_id)
        if self.per_step is not None:
            self.per_step.at_boundary()
        return self._placement.epoch

    def route(self) -> RouteTable:
        """The per-call route: the current epoch over the holders not marked down."""
        route = self._route
        version = self.liveness.version
        if route is None or route.version != version or route.epoch != self._placement.epoch:
            down = self.liveness.down()
            usable = {w for w in self._placement.workers if w not in down}
            route = self._route = RouteTable(self.cfg, self._placement, usable, version)
        return route

    # ---- dispatch --------------------------------------------------------------------------------

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingExperts:
        if self.per_step is not None:
            return self.per_step.dispatch(layer, x, topk_ids, topk_weights)
        return self.per_call.dispatch(layer, x, topk_ids, topk_weights, self.route())

    def begin_step(self, counts: list[int]) -> None:
        if self.per_step is not None:
            self.per_step.begin_step(counts)

    def send(self, worker: str, layer: int, groups: list[int], x, ids, weights, rows=None) -> Sent:
        """One call over the per-call carrier, its deadline fixed now; its latency is recorded when
        the reply arrives (on the carrier's thread)."""
        clock = self.liveness.clock
        sent_at = clock()
        fut = self.carrier.call(worker, layer, groups, x, ids, weights)

        def arrived(f) -> None:
            if not f.cancelled() and f.exception() is None:
                self.liveness.record(clock() - sent_at)

        fut.add_done_callback(arrived)
        return Sent(worker, list(groups), rows, x, ids, weights, fut, sent_at + self.liveness.deadline_s())

    # ---- liveness (invariant 4) ------------------------------------------------------------------

    def mark_down(self, worker_id: str) -> None:
        if self.liveness.mark_down(worker_id):
            self.failover.worker_down(worker_id)

    def replaced(self, ref: WorkerRef) -> None:
        """A replacement of ref.worker_id is up: connect it under the same id."""
        self.carrier.disconnect(ref.worker_id)
        self.carrier.connect(ref)
        with self._lock:
            self.workers[ref.worker_id] = ref
        self.liveness.revive(ref.worker_id)

    def call_deadline_s(self) -> float:
        return self.liveness.deadline_s()

    def groups_without_live_holder(self) -> list[int]:
        """Groups every current holder of which has failed (served by failover until repaired)."""
        down = self.liveness.down()
        return [g for g in range(self.cfg.n_groups) if all(h in down for h in self._placement.holders_of(g))]

    # ---- CUDA graphs: the step path's (the step lane over nccl) ----------------------------------

    @property
    def graph_safe(self) -> bool:
        return self.per_step is not None and self.per_step.graph_safe

    def graph_prepare(self, key, counts: list[int]) -> bool:
        return self.per_step is not None and self.per_step.graph_prepare(key, counts)

    def graph_captured(self, key, ok: bool = True) -> None:
        if self.per_step is not None:
            self.per_step.graph_captured(key, ok)

    def graph_begin(self, key) -> bool:
        return self.per_step is not None and self.per_step.graph_begin(key)

    def graph_end(self) -> None:
        if self.per_step is not None:
            self.per_step.graph_end()

    # ---- metrics and teardown ------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """The replica's own groups (the local holder); the failover copy loads only on demand."""
        return self.local.nbytes if self.local is not None else 0

    @property
    def retries(self) -> int:
        return self.failover.retries

    @property
    def local_calls(self) -> int:
        return self.failover.fallback.calls if self.failover.fallback is not None else 0

    def metrics(self, reset: bool = False) -> dict:
        """Group load per layer (see actors/experts/group_load.py) + epoch, retries, failed workers."""
        step = self.per_step
        if step is not None:
            step.flush_load()
        out = {**self.load.snapshot(reset), "epoch": self.epoch, "retries": self.retries,
               "down": sorted(self.liveness.down()), "local_calls": self.local_calls,
               "call_deadline_s": self.call_deadline_s()}
        if step is not None:
            out.update(link_failures=step.link_failures, graph_replays=step.graph_replays)
        return out

    def close(self) -> None:
        self.failover.close()
        if self.per_step is not None:
            self.per_step.carrier.close()
        self.carrier.close()
        if self.local is not None:
            self.local.close()


def _remote(workers) -> list[str]:
    """Holders reached over a carrier (every holder but the replica itself)."""
    return [w for w in workers if w != LOCAL]

