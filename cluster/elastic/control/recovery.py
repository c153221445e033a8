"""Putting the elastic state back together (invariant 5): after a controller restart (finish or roll
back the journaled operation, stop orphans), after Redis lost everything (rebuild from the live
workers, or restore what the controller remembers), and against stray worker actors."""

from __future__ import annotations

import logging
import threading

import ray

from actors.experts.local_holder import LOCAL
from actors.experts.placement import Placement, plan_groups
from cluster.elastic.control.ports import RayPorts
from cluster.elastic.inventory import Inventory, WorkerState
from cluster.elastic.migration import MigrationRunner, Operation, Phase
from cluster.elastic.policy.guarded import GuardedPolicy
from cluster.elastic.store import ElasticStore

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, store: ElasticStore, inventory: Inventory, ports: RayPorts, runner: MigrationRunner,
                 policy: GuardedPolicy, n_groups: int, lock: threading.Lock) -> None:
        self.store = store
        self.inventory = inventory
        self.fleet = inventory.fleet
        self.ports = ports
        self.runner = runner
        self.policy = policy
        self.n_groups = n_groups
        self.lock = lock

    def recover(self) -> None:
        """At start, and whenever a journal is found between operations."""
        with self.lock:
            journal = self.store.operation()
            if journal is not None:
                op = Operation.from_dict(journal)
                if op.phase not in (Phase.DONE, Phase.ROLLED_BACK):
                    log.warning("resuming operation %s from phase %s", op.op_id, op.phase.value)
                    op = self.runner.resume(op)
                self.inventory.settle(op)
                self.store.end_operation(op.op_id)
            p = self.store.placement()
            if p is None and self.fleet.running():
                p = self._rebuild_from_workers()
            if p is not None:
                self.inventory.remember(p)
                self._sweep_orphans(p)
            state = self.store.controller()
            if "last_scale_at" in state:
                self.policy.last_change_at = float(state["last_scale_at"])

    def _rebuild_from_workers(self) -> Placement:
        """Redis lost everything and so did we: ask the workers what they hold, and publish that
        above every epoch a replica reports so replicas adopt it."""
        held: dict[int, list[str]] = {}
        for wid in self.fleet.running():
            try:
                if not self.fleet.serves_this_model(wid):  # another deployment's: never adopted
                    log.warning("worker %s serves another model spec or carrier; stopping it", wid)
                    self.fleet.stop(wid)
                    continue
                for g in ray.get(self.fleet.handle(wid).held_groups.remote(), timeout=10):
                    held.setdefault(int(g), []).append(wid)
                self.inventory.set_state(wid, WorkerState.SERVING)
            except Exception as e:  # noqa: BLE001
                log.warning("worker %s did not answer during rebuild: %s", wid, e)
        workers = sorted({w for ws in held.values() for w in ws}) or ["w0"]
        groups = {g: tuple(held.get(g, ())) for g in range(self.n_groups)}
        if any(not hs for hs in groups.values()):
            fixed = plan_groups(self.n_groups, workers, groups)
            for wid in workers:
                if wid not in self.fleet.running():
                    self.inventory.start_worker(wid)
                need = [g for g, hs in fixed.items() if wid in hs and wid not in groups[g]]
                if need:
                    self.ports.load(wid, need, {})
            groups = fixed
        floor = max(self.store.live_replicas(3600).values(), default=-1) + 1
        self.store.restore_placement(Placement(floor, tuple(groups[g] for g in range(self.n_groups))))
        log.warning("placement rebuilt from live workers at epoch %d", floor)
        return self.store.placement()

    def _sweep_orphans(self, p: Placement) -> None:
        """Workers nobody routes to (a scale-up that died before its journal) are stopped."""
        used = set(p.workers) - {LOCAL}
        for wid, rec in self.store.workers().items():
            if wid not in used and rec.state not in (WorkerState.SERVING.value, WorkerState.STANDBY.value):
                log.warning("removing orphan worker %s (%s)", wid, rec.state)
                self.ports.stop_worker(wid)
        inventory = set(self.store.workers())
        for wid in self.fleet.running():
            if wid not in used and wid not in inventory:
                self.fleet.stop(wid)
        for wid in used:
            if wid not in self.store.workers():
                self.inventory.set_state(wid, WorkerState.SERVING)

    def restore_if_empty(self) -> None:
        """Redis restarted without persistence: put back what we know before anything else."""
        known = self.inventory.known
        if known is None or self.store.placement() is not None:
            return
        log.warning("Redis has no placement: restoring epoch %d from the controller", known.epoch)
        floor = max(self.store.live_replicas(3600).values(), default=-1)
        p = known if known.epoch >= floor else Placement(floor + 1, known.holders)
        self.store.restore_placement(p)
        for rec in self.inventory.known_workers.values():
            self.store.put_worker(rec)
        if self.policy.last_change_at is not None:
            self.store.set_controller(last_scale_at=self.policy.last_change_at)

    def sweep_strays(self) -> list[str]:
        """Stop worker actors that neither the placement nor the inventory knows: e.g. a replacement
        a replica started for a dead worker after the controller's repair had already moved its
        groups elsewhere. Only between operations, so a worker being added is never mistaken."""
        if not self.lock.acquire(blocking=False):
            return []
        try:
            p = self.store.placement()
            if p is None:
                return []
            known = set(p.workers) | set(self.store.workers())
            strays = [w for w in self.fleet.running() if w not in known]
            for wid in strays:
                log.warning("stopping stray worker %s (not in the placement or inventory)", wid)
                self.fleet.stop(wid)
            return strays
        finally:
            self.lock.release()
