"""The device inventory: which expert workers exist and what each is doing, kept in Redis
(`P:workers`, cluster/elastic/store.py) so a restarted controller finds it again (invariant 5).

A worker record is removed, not marked, when its worker stops: there is no "stopped" state.

  STARTING  its actor is being started, or it gains groups in a scale-up not yet done
  STANDBY   warm and empty (elastic.standby_workers): a scale-up only has to load groups onto it
  SERVING   in the placement, or emptied by a migration and still a device until scaled away
  DRAINING  being scaled away: its groups move to the others, then it is stopped
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Callable

import ray

from actors.experts.local_holder import LOCAL
from actors.experts.placement import Placement
from cluster.elastic.migration import Operation, Phase
from cluster.elastic.store import ElasticStore, WorkerRecord
from cluster.elastic.worker_fleet import WorkerFleet, actor_name

log = logging.getLogger(__name__)


class WorkerState(str, Enum):
    STARTING = "starting"
    STANDBY = "standby"
    SERVING = "serving"
    DRAINING = "draining"


def worker_order(wid: str) -> tuple[int, str]:
    """w2 before w10; ids that are not w<number> last."""
    return (int(wid[1:]) if wid[1:].isdigit() else 1 << 30, wid)


class Inventory:
    """Worker records in Redis plus the controller's own copy of them and of the last placement,
    which it puts back if Redis comes back empty."""

    def __init__(self, store: ElasticStore, fleet: WorkerFleet, clock: Callable[[], float]) -> None:
        self.store = store
        self.fleet = fleet
        self.clock = clock
        self.known: Placement | None = None  # last placement seen
        self.known_workers: dict[str, WorkerRecord] = {}
        self.on_start: Callable[[str], None] = lambda wid: None  # a fresh worker's counters are zero

    def remember(self, p: Placement) -> None:
        self.known = p
        self.known_workers = self.store.workers()

    def set_state(self, wid: str, state: WorkerState) -> None:
        rec = self.store.workers().get(wid) or WorkerRecord(wid, actor_name(wid), created_at=self.clock())
        rec.state = WorkerState(state).value
        self.store.put_worker(rec)
        self.known_workers[wid] = rec

    def forget(self, wid: str) -> None:
        self.store.remove_worker(wid)
        self.known_workers.pop(wid, None)

    def start_worker(self, wid: str) -> None:
        """Start the actor (STARTING) and record where it runs; forgotten again if it fails."""
        self.set_state(wid, WorkerState.STARTING)
        try:
            self.fleet.start(wid)
        except Exception:
            self.forget(wid)
            raise
        info = self._device_info(wid, timeout_s=30)
        self.on_start(wid)
        rec = self.store.workers()[wid]
        rec.info = info
        self.store.put_worker(rec)

    def _device_info(self, wid: str, timeout_s: float) -> dict:
        """Where the worker's process runs, for the record (status shows it)."""
        try:
            node = ray.get(self.fleet.handle(wid).device_info.remote(), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - informational only
            node = {}
        return {"device": node.get("device"), "pid": node.get("pid"), "node_id": node.get("node_id"),
                "resources": node.get("assigned_resources")}

    def note_pids(self, pids: dict[str, int]) -> None:
        """Workers answered from these processes: a record that names another pid belongs to a
        process that was replaced under the same id (a replica's replacement, cluster/serve/
        data_plane.py), so its device info is read again and the status shows the live process."""
        for wid, pid in pids.items():
            rec = self.store.workers().get(wid)
            if rec is None or rec.info.get("pid") == pid:
                continue
            info = self._device_info(wid, timeout_s=5)
            rec = self.store.workers().get(wid)  # re-read: an operation may have changed the state meanwhile
            if rec is None:
                continue
            rec.info = {**info, "pid": pid} if info.get("pid") in (None, pid) else info
            log.info("worker %s now runs as pid %s", wid, rec.info["pid"])
            self.store.put_worker(rec)
            self.known_workers[wid] = rec

    def in_state(self, state: WorkerState) -> list[str]:
        return sorted((w for w, r in self.store.workers().items() if r.state == state.value), key=worker_order)

    def standby(self, alive_only: bool = False) -> list[str]:
        ids = self.in_state(WorkerState.STANDBY)
        return [w for w in ids if self.fleet.alive(w)] if alive_only else ids

    def devices(self, p: Placement | None = None) -> list[str]:
        """Serving workers: those in the placement plus any that hold nothing right now (a
        migration may empty a worker; it stays a device until scaled away)."""
        p = p or self.store.placement()
        held = set(p.workers if p else ()) - {LOCAL}  # the replicas themselves are no worker
        return sorted(held | set(self.in_state(WorkerState.SERVING)), key=worker_order)

    def next_ids(self, k: int) -> list[str]:
        """`k` fresh worker ids, above every id in use anywhere (Redis, Ray, the last placement)."""
        used = set(self.store.workers()) | set(self.fleet.running())
        if self.known is not None:
            used |= set(self.known.workers)
        nums = [int(w[1:]) for w in used if w[1:].isdigit()]
        start = max(nums, default=-1) + 1
        return [f"w{start + i}" for i in range(k)]

    def settle(self, op: Operation) -> None:
        """After an operation: its added workers serve (DONE) or are gone (rolled back); its retired
        workers are gone once it is DONE."""
        if op.phase == Phase.DONE:
            for w in op.added_workers:
                self.set_state(w, WorkerState.SERVING)
        for w in op.retired_workers if op.phase == Phase.DONE else op.added_workers:
            self.forget(w)
