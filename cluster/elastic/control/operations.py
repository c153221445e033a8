"""The operations that change the placement: scale, migrate and repair. Each plans a new map with
the one placement rule (actors/experts/placement.py) and runs it through the migration protocol
(cluster/elastic/migration.py), one at a time under the controller's operation lock.

With elastic.local_groups the replicas' own device is the first device, holder "local": scale
1 -> 2 moves half the groups from "local" to a new worker, 2 -> 1 moves them back and retires it,
and a repair with no live worker puts every group back in the replicas."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from actors.experts.group_sources import chain_of
from actors.experts.local_holder import LOCAL
from actors.experts.placement import Groups, Placement, groups_of, move_group, plan_groups
from cluster.elastic.control.ports import RayPorts
from cluster.elastic.inventory import Inventory, WorkerState, worker_order
from cluster.elastic.migration import MigrationRunner, Operation, validate_map
from cluster.elastic.policy.guarded import GuardedPolicy
from cluster.elastic.store import ElasticStore

# An admin operation waits this long for the lock before answering busy: the controller's own
# period takes it briefly (sweeping strays, refilling standbys), and a `moge scale` that lands in
# that window should run, not bounce. Another operation in flight still answers busy.
OPERATION_LOCK_WAIT_S = 5.0

log = logging.getLogger(__name__)


class ControllerBusy(RuntimeError):
    """Another operation is in flight (HTTP 409)."""


class BadRequest(ValueError):
    """The request cannot be satisfied as asked (HTTP 400)."""


class Operations:
    def __init__(self, store: ElasticStore, inventory: Inventory, ports: RayPorts, runner: MigrationRunner,
                 policy: GuardedPolicy, n_groups: int, lock: threading.Lock, clock: Callable[[], float],
                 local_groups: bool = False) -> None:
        self.store = store
        self.inventory = inventory
        self.fleet = inventory.fleet
        self.ports = ports
        self.runner = runner
        self.policy = policy
        self.n_groups = n_groups
        self.lock = lock
        self.clock = clock
        self.local = [LOCAL] if local_groups else []  # the replicas' device, first of the devices
        # what an admin operation does before it is journaled (starting workers), for status readers
        self.preparing: dict | None = None

    def run(self, kind: str, new_groups: Groups, added: list[str] = (), retired: list[str] = (),
            p: Placement | None = None) -> dict:
        p = p or self.store.placement()
        validate_map(new_groups, self.n_groups)
        op = Operation(kind, p.epoch, groups_of(p), new_groups, added_workers=list(added),
                       retired_workers=list(retired), started_at=self.clock())
        op.detail["t"] = {"decision": op.started_at}
        self.store.begin_operation(op.to_dict())
        self.ports.last_loads = []
        op = self.runner.run(op)
        self.inventory.settle(op)
        self._count(kind, added, op.phase.value)  # before the journal clears: an idle status implies it
        self.store.end_operation(op.op_id)
        now = self.store.placement()
        if now is not None:
            self.inventory.remember(now)
        return {"op_id": op.op_id, "kind": kind, "phase": op.phase.value, "error": op.error,
                "from_epoch": op.from_epoch, "epoch": now.epoch if now else None,
                "timeline": op.detail.get("t", {}), "workers": self.inventory.devices(now) if now else [],
                "loads": [{k: v for k, v in a.items() if k in ("groups", "bytes", "seconds", "source", "attempts")}
                          for a in self.ports.last_loads]}

    def _count(self, kind: str, added: list[str], outcome: str) -> None:
        """For /metrics (moge_placement_operations_total): a scale counts as scale_up or scale_down."""
        if kind == "scale":
            kind = "scale_up" if added else "scale_down"
        try:
            self.store.count_operation(kind, outcome)
        except Exception as e:  # noqa: BLE001 - a counter must never fail the operation it counts
            log.warning("operation not counted: %s", e)

    def scale(self, devices: int, reason: str = "admin", source: str | None = None) -> dict:
        """Grow or shrink to `devices` expert workers, live. Raises ControllerBusy / BadRequest.
        `source` overrides elastic.migration_source for this operation (benchmarks compare paths)."""
        lo, hi = self.policy.min_devices, self.policy.max_devices
        if not isinstance(devices, int) or not lo <= devices <= hi:
            raise BadRequest(f"devices must be an integer in [{lo}, {hi}] "
                             "(elastic.policy.min_devices/max_devices)")
        if source is not None:
            try:
                chain_of(source)
            except ValueError as e:
                raise BadRequest(str(e)) from e
        if not self.lock.acquire(timeout=OPERATION_LOCK_WAIT_S):
            raise ControllerBusy("another operation is in flight")
        default_source = self.ports.source
        self.ports.source = source or default_source
        try:
            if self.local:  # replicas fetching groups back follow this operation's source
                self.store.set_controller(migration_source=self.ports.source)
            t0 = self.clock()
            p = self.store.placement()
            if p is None:
                raise BadRequest("no placement yet: the cluster has not been bootstrapped")
            current = self.local + self.inventory.devices(p)
            if devices == len(current):
                return {"phase": "noop", "epoch": p.epoch, "workers": current}
            result = self._grow(p, current, devices) if devices > len(current) else self._shrink(p, current, devices)
            result["timeline"]["decision"] = t0
            result["source"] = self.ports.source
            if result["phase"] == "done":
                done_at = self.clock()  # cooldown runs from when the new capacity serves
                self.policy.record_change(done_at)
                self.store.set_controller(last_scale_at=done_at, desired_devices=devices, last_reason=reason)
            return result
        finally:
            self.preparing = None
            self.ports.source = default_source
            self.lock.release()

    def _grow(self, p: Placement, current: list[str], devices: int) -> dict:
        need = devices - len(current)
        warm = self.inventory.standby(alive_only=True)[:need]
        added = warm + self.inventory.next_ids(need - len(warm))
        started = []
        self.preparing = {"op_id": f"start-{self.clock()}", "kind": "scale", "phase": "starting_workers",
                          "workers": added[len(warm):]}
        try:
            for wid in added[len(warm):]:
                self.inventory.start_worker(wid)
                started.append(wid)
        except Exception as e:
            for wid in started:
                self.ports.stop_worker(wid)
            raise RuntimeError(f"could not start a worker for the new device: {e}") from e
        t_ready = self.clock()
        for wid in warm:
            self.inventory.set_state(wid, WorkerState.STARTING)
        result = self.run("scale", plan_groups(self.n_groups, current + added, groups_of(p)), added=added, p=p)
        result["timeline"]["worker_ready"] = t_ready
        result["from_standby"] = warm
        return result

    def _shrink(self, p: Placement, current: list[str], devices: int) -> dict:
        retired = current[devices:]
        for wid in retired:
            self.inventory.set_state(wid, WorkerState.DRAINING)
        result = self.run("scale", plan_groups(self.n_groups, current[:devices], groups_of(p)),
                          retired=retired, p=p)
        if result["phase"] != "done":
            for wid in retired:
                self.inventory.set_state(wid, WorkerState.SERVING)
        return result

    def migrate(self, group: int, worker: str, replicate: bool = False) -> dict:
        """Move (or replicate) one group onto a serving worker, live."""
        if not self.lock.acquire(timeout=OPERATION_LOCK_WAIT_S):
            raise ControllerBusy("another operation is in flight")
        try:
            p = self.store.placement()
            if p is None:
                raise BadRequest("no placement yet")
            if not isinstance(group, int) or not 0 <= group < self.n_groups:
                raise BadRequest(f"group must be an integer in [0, {self.n_groups - 1}]")
            devices = self.inventory.devices(p)
            if worker not in devices:
                raise BadRequest(f"unknown worker {worker!r}; serving workers: {devices}")
            new = move_group(groups_of(p), group, worker, replicate)
            if new == groups_of(p):
                return {"phase": "noop", "epoch": p.epoch, "workers": list(p.workers)}
            return self.run("migrate", new, p=p)
        finally:
            self.lock.release()

    def repair(self, probe: Callable[[list[str]], list[str]] | None = None,
               suspects: set[str] | None = None) -> dict | None:
        """Take dead (or hung) workers out of the placement, reloading their groups on the living.
        `probe(workers)` -> those that do not answer (one parallel ping, latency-derived deadline:
        WorkerSampler.unanswered); `suspects`: only these are probed (the ones the controller's
        stats read just missed), None probes every device."""
        probe = probe or (lambda ws: [w for w in ws if not self.fleet.alive(w)])
        # Look before locking: pinging workers takes up to seconds under load, and an admin scale
        # arriving meanwhile must not be told "busy" by a check that finds nothing dead.
        p = self.store.placement()
        if p is None:
            return None
        candidates = [w for w in self.inventory.devices(p) if suspects is None or w in suspects]
        dead = probe(candidates) if candidates else []
        if not dead:
            return None
        if not self.lock.acquire(blocking=False):
            return None
        try:
            p = self.store.placement()
            if p is None:
                return None
            devices = self.inventory.devices(p)
            dead = [w for w in dead if w in devices]  # still a device: not retired meanwhile
            if not dead:
                return None
            alive = self.local + [w for w in devices if w not in dead]
            added: list[str] = []
            if not alive:
                added = self.inventory.next_ids(1)
                self.inventory.start_worker(added[0])
            survivors = {g: tuple(h for h in hs if h not in dead) for g, hs in groups_of(p).items()}
            new = plan_groups(self.n_groups, sorted(alive, key=lambda w: (w != LOCAL, worker_order(w))) + added,
                              survivors)
            log.warning("repairing placement: dead workers %s", dead)
            result = self.run("repair", new, added=added, p=p)
            if result["phase"] == "done":
                for w in dead:
                    self.fleet.stop(w)
                    self.store.remove_worker(w)
            return result
        finally:
            self.lock.release()
