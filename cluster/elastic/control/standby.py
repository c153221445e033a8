"""Standby workers: `elastic.standby_workers` warm, empty expert workers kept outside the
placement, so a scale-up only has to load groups (not start a process and a device)."""

from __future__ import annotations

import threading

from cluster.elastic.inventory import Inventory, WorkerState


def replenish_standby(inventory: Inventory, want: int, lock: threading.Lock) -> list[str]:
    """Forget dead standbys and start new ones up to `want`; returns the ids started. Nothing
    happens while an operation holds the lock."""
    if want == 0 and not inventory.standby():
        return []  # nothing to do: do not take the lock an admin scale may be asking for
    if not lock.acquire(blocking=False):
        return []
    try:
        for wid in inventory.standby():
            if not inventory.fleet.alive(wid):
                inventory.fleet.stop(wid)
                inventory.forget(wid)
        started = []
        for wid in inventory.next_ids(max(0, want - len(inventory.standby()))):
            inventory.start_worker(wid)
            inventory.set_state(wid, WorkerState.STANDBY)
            started.append(wid)
            try:  # compile and tune the expert kernels now, not in the scale-up that takes it
                inventory.fleet.handle(wid).warmup.remote()
            except Exception:  # noqa: BLE001 - a warm-up is an optimisation; the scale-up warms anyway
                pass
        return started
    finally:
        lock.release()
