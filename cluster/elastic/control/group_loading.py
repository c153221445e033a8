"""The controller's side of loading groups onto a migration target: which source each group
comes from (the configured chain, actors/experts/group_sources.py), which holder serves it, and
the replica-local holder ("local": attention replicas holding groups in process).

  target is a worker, holder a worker      device lane from the holder's copy endpoint, then its
                                           object store export, then the checkpoint
  target is a worker, holder is "local"    device lane from a live replica's copy endpoint (every
                                           replica holds the same bytes), then the checkpoint
  target is "local"                        nothing here: each replica fetches the groups itself on
                                           its listener thread before it adopts the epoch, and its
                                           acknowledgement is what the protocol waits for
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from actors.experts.group_sources import chain_of
from actors.experts.local_holder import LOCAL

log = logging.getLogger(__name__)


def load_onto(fleet: Any, store: Any, worker: str, groups: list[int], peers: dict[int, str | None],
              source: str, deadline_s: float, load_timeout_s: float, replica_ttl_s: float = 10.0) -> list[dict]:
    """Load `groups` onto `worker` (warm-up not included). -> one load_groups answer per holder."""
    if worker == LOCAL:
        return []
    chain = list(chain_of(source))
    target = fleet.handle(worker)
    by_peer: dict[str | None, list[int]] = {}
    for g in groups:
        peer = peers.get(g) if chain != ["checkpoint"] else None
        by_peer.setdefault(peer, []).append(g)
    answers = []
    for peer, gs in by_peer.items():
        handle, copy = _holder(fleet, store, peer, replica_ttl_s)
        answer = ray.get(target.load_groups.remote(gs, handle, chain, copy, deadline_s), timeout=load_timeout_s)
        if any("error" in a for a in answer.get("attempts", ())):
            log.warning("groups %s onto %s came from %s after %s", gs, worker, answer["source"], answer["attempts"])
        answers.append(answer)
    return answers


def _holder(fleet: Any, store: Any, peer: str | None, replica_ttl_s: float) -> tuple[Any, dict | None]:
    """(Ray handle for the object store, copy endpoint for the device lane) of the holder."""
    if peer is None:
        return None, None
    if peer == LOCAL:
        endpoints = store.copy_endpoints(replica_ttl_s)
        return None, next(iter(endpoints.values()), None)
    try:
        handle = fleet.handle(peer)
    except ValueError:
        return None, None  # the holder is gone: the checkpoint has the weights too
    try:
        copy = ray.get(handle.endpoint.remote(), timeout=10).get("copy")
    except Exception as exc:  # noqa: BLE001 - an unresponsive holder: its object store may still answer
        log.info("no copy endpoint from %s: %s", peer, exc)
        copy = None
    return handle, copy
