"""The migration protocol's ports (cluster/elastic/migration.py MigrationPorts) over real expert
workers in Ray and the placement in Redis. Loads copy from a peer holder when
`elastic.migration_source` is "peer" and fall back to the checkpoint if the peer fails mid-copy."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray

from actors.experts.placement import Groups, groups_of
from cluster.elastic.migration import Operation
from cluster.elastic.store import ElasticStore
from cluster.elastic.worker_fleet import WorkerFleet

log = logging.getLogger(__name__)


class RayPorts:
    """MigrationPorts over real expert workers (Ray) and the Redis store."""

    def __init__(self, fleet: WorkerFleet, store: ElasticStore, clock: Callable[[], float],
                 replica_ttl_s: float = 10.0, load_timeout_s: float = 600.0, poll_s: float = 0.02,
                 from_peers: bool = True) -> None:
        self.fleet = fleet
        self.clock = clock
        self.from_peers = from_peers
        self.store = store
        self.replica_ttl_s = replica_ttl_s
        self.load_timeout_s = load_timeout_s
        self.poll_s = poll_s
        self.load_delay_s = 0.0  # test hook: widen the loading window so a test can kill the target
        self.before_stop: Any = None  # called with a worker id before it is stopped (last metrics)
        self.loaded_bytes = 0

    def load(self, worker: str, groups: list[int], peers: dict[int, str | None]) -> None:
        target = self.fleet.handle(worker)
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        by_peer: dict[str | None, list[int]] = {}
        for g in groups:
            by_peer.setdefault(peers.get(g) if self.from_peers else None, []).append(g)
        for peer, gs in by_peer.items():
            peer_handle = None
            if peer is not None:
                try:
                    peer_handle = self.fleet.handle(peer)
                except ValueError:
                    peer_handle = None  # the peer is gone: the checkpoint has the weights too
            try:
                out = ray.get(target.load_groups.remote(gs, peer_handle), timeout=self.load_timeout_s)
            except ray.exceptions.RayActorError:
                raise  # the target itself died: the operation fails and rolls back
            except Exception as e:  # noqa: BLE001 - the peer failed mid-copy: load from the checkpoint
                if peer_handle is None:
                    raise
                log.warning("peer copy of %s from %s failed (%s); loading from the checkpoint", gs, peer, e)
                out = ray.get(target.load_groups.remote(gs, None), timeout=self.load_timeout_s)
            self.loaded_bytes += int(out.get("bytes", 0))
        ray.get(target.warmup.remote(), timeout=self.load_timeout_s)

    def drop(self, worker: str, groups: list[int]) -> None:
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
