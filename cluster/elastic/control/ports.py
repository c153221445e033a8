"""The migration protocol's ports (cluster/elastic/migration.py MigrationPorts) over real expert
workers in Ray and the placement in Redis. Loads walk the chain of `elastic.migration_source`
(device lane, object store, checkpoint: actors/experts/group_sources.py) from a current holder; the
replica-local holder ("local") loads and drops on the replicas' side (group_loading.py)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray

from actors.experts.placement import Groups, groups_of
from actors.experts.local_holder import LOCAL
from cluster.elastic.control.group_loading import load_onto
from cluster.elastic.migration import Operation
from cluster.elastic.store import ElasticStore
from cluster.elastic.worker_fleet import WorkerFleet

log = logging.getLogger(__name__)


class RayPorts:
    """MigrationPorts over real expert workers (Ray) and the Redis store."""

    def __init__(self, fleet: WorkerFleet, store: ElasticStore, clock: Callable[[], float],
                 replica_ttl_s: float = 10.0, load_timeout_s: float = 600.0, poll_s: float = 0.02,
                 source: str = "peer", deadline_s: float = 60.0) -> None:
        self.fleet = fleet
        self.clock = clock
        self.source = source  # elastic.migration_source: the first of a fallback chain
        self.deadline_s = deadline_s  # per source step: a holder that does not answer costs at most this
        self.store = store
        self.replica_ttl_s = replica_ttl_s
        self.load_timeout_s = load_timeout_s
        self.poll_s = poll_s
        self.load_delay_s = 0.0  # test hook: widen the loading window so a test can kill the target
        self.before_stop: Any = None  # called with a worker id before it is stopped (last metrics)
        self.loaded_bytes = 0
        self.last_loads: list[dict] = []  # load_groups answers of the current operation (source, attempts)

    def load(self, worker: str, groups: list[int], peers: dict[int, str | None]) -> None:
        if worker == LOCAL:
            return  # replicas fetch their own groups before acknowledging (group_loading.py)
        target = self.fleet.handle(worker)
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        for out in load_onto(self.fleet, self.store, worker, groups, peers, self.source, self.deadline_s,
                             self.load_timeout_s, self.replica_ttl_s):
            self.loaded_bytes += int(out.get("bytes", 0))
            self.last_loads.append(out)
        ray.get(target.warmup.remote(), timeout=self.load_timeout_s)

    def drop(self, worker: str, groups: list[int]) -> None:
        if worker == LOCAL:
            return  # each replica lets go of them at the step boundary that swaps the epoch in
        ray.get(self.fleet.handle(worker).drop_groups.remote(groups), timeout=60)

    def publish(self, groups: Groups, expected_epoch: int) -> int:
        return self.store.publish_placement(groups, expected_epoch)

    def current(self) -> tuple[int, Groups]:
        p = self.store.placement()
        if p is None:
            return -1, {}
        return p.epoch, groups_of(p)

    def wait_acks(self, epoch: int, timeout_s: float) -> bool:
        # a bounded wait, not a decision: measured on the monotonic clock, like every timeout
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                live = self.store.live_replicas(self.replica_ttl_s)
                if all(e >= epoch for e in live.values()):
                    return True
            except Exception as e:  # noqa: BLE001 - Redis blip: keep waiting until the deadline
                log.info("waiting for acks of epoch %d: %s", epoch, e)
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)

    def stop_worker(self, worker: str) -> None:
        if self.before_stop is not None:
            self.before_stop(worker)
        self.fleet.stop(worker)
        self.store.remove_worker(worker)

    def journal(self, op: Operation) -> None:
        op.detail.setdefault("t", {}).setdefault(op.phase.value, self.clock())
        self.store.update_operation(op.to_dict())
