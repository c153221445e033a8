"""What the controller reports: `status` (GET /admin/status, `moge status`) and `consistency` (the
check the integration tests and operators run after chaos)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray

from actors.experts.local_holder import LOCAL
from cluster.elastic.inventory import Inventory, WorkerState, worker_order
from cluster.elastic.policy.policies import Decision


def status(inventory: Inventory, section: Any, n_groups: int, replica_ttl_s: float,
           last_decision: Decision | None, last_error: str | None, started_at: float) -> dict:
    store = inventory.store
    p = store.placement()
    window = store.window(section.window_s)
    workers = {}
    for wid, rec in sorted(store.workers().items(), key=lambda kv: worker_order(kv[0])):
        workers[wid] = {**asdict(rec), "groups": list(p.groups_of(wid)) if p else [],
                        "utilisation": window.utilisation().get(wid)}
    return {
        "epoch": p.epoch if p else None,
        "placement": {str(g): list(hs) for g, hs in enumerate(p.holders)} if p else {},
        "devices": len(inventory.devices(p)) if p else 0,
        "standby": inventory.standby(),
        "workers": workers,
        "replicas": store.live_replicas(replica_ttl_s),
        "operation": store.operation(),
        "group_tokens": window.group_tokens(),
        "group_imbalance": window.group_imbalance(n_groups),
        "tokens_per_s": window.tokens_per_s(),
        "ttft_p99_ms": window.ttft_p(99), "itl_p99_ms": window.itl_p(99),
        "policy": {"name": section.name, "min_devices": section.min_devices, "max_devices": section.max_devices,
                   "last_decision": asdict(last_decision) if last_decision else None},
        "last_error": last_error,
        "started_at": started_at,
    }


def consistency(inventory: Inventory) -> list[str]:
    """Problems with the placement as it stands (empty = consistent): every group held, every
    holder alive and really holding what the placement says, no operation left in flight,
    inventory equal to the placement's workers, no stray worker actors."""
    store, fleet = inventory.store, inventory.fleet
    problems: list[str] = []
    p = store.placement()
    if p is None:
        return ["no placement in Redis"]
    for wid in inventory.devices(p):
        try:
            held = set(ray.get(fleet.handle(wid).held_groups.remote(), timeout=10))
        except Exception as e:  # noqa: BLE001
            problems.append(f"worker {wid} unreachable: {type(e).__name__}")
            continue
        missing = set(p.groups_of(wid)) - held
        if missing:
            problems.append(f"worker {wid} lacks groups {sorted(missing)}")
    if store.operation() is not None:
        problems.append(f"operation still in flight: {store.operation().get('phase')}")
    inv = set(inventory.in_state(WorkerState.SERVING))
    standby = set(inventory.standby())
    if not set(p.workers) - {LOCAL} <= inv or set(store.workers()) != inv | standby:
        problems.append(f"inventory {sorted(store.workers())} does not match placement workers "
                        f"{sorted(p.workers)} (all serving)")
    stray = set(fleet.running()) - inv - standby
    if stray:
        problems.append(f"stray worker actors {sorted(stray)}")
    return problems
