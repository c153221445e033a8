"""The expert workers as a replica uses them: started (or found) for a static placement, replaced
when a call finds one dead or hung, and the replica's own failover copy of the experts.

Several replicas may start at once: workers are named, detached actors (cluster/elastic/
worker_fleet.py), so every replica finds the same w0..w{D-1}; the placement at start is the pure
pack_groups, so every replica computes the same epoch-0 placement; load_groups skips groups
already held. In an elastic cluster the controller owns the placement and replicas adopt its
epochs between steps; a replica still replaces a worker its calls found dead, under the same id.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import ray

from actors.experts.carriers.base import WorkerRef
from actors.experts.placement import Placement
from cluster.config import MogeConfig
from cluster.elastic.worker_fleet import WorkerFleet, model_spec

log = logging.getLogger(__name__)

WORKER_NAMESPACE = "moge"  # workers are found by name from Serve replicas, whose own namespace differs
REPLACE_ATTEMPTS = 5
HUNG_PING_S = 5.0  # a worker that does not answer a ping this soon is hung: replaced, not waited for
READY_TIMEOUT_S = 300.0


def worker_ids(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def local_fallback(config: MogeConfig, device) -> "ExpertWorker":
    """An in-process expert worker on the replica's device that computes a group from the
    checkpoint while no remote holder answers for it (the Dispatcher loads it off the step
    thread: at start when warm, else when a worker is first marked down)."""
    from actors.experts.worker.worker import ExpertWorker

    return ExpertWorker("replica-fallback", {**model_spec(config), "device": str(device)}, "inprocess")


class ReplicaWorkers:
    """Starts, finds and replaces the expert workers of one deployment."""

    def __init__(self, config: MogeConfig, fleet: WorkerFleet | None = None, namespace: str = WORKER_NAMESPACE) -> None:
        self.config = config
        self.fleet = fleet or WorkerFleet(config, namespace)

    def start(self, placement: Placement, ready_timeout_s: float = READY_TIMEOUT_S) -> dict[str, WorkerRef]:
        """Every worker of `placement` running and holding its groups, warmed up."""
        workers = list(placement.workers)
        with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:  # actor start-ups overlap
            handles = dict(zip(workers, pool.map(lambda w: self.fleet.start(w, ready_timeout_s), workers)))
        loads = [handles[w].load_groups.remote(list(placement.groups_of(w))) for w in workers]
        ray.get(loads, timeout=ready_timeout_s)
        ray.get([handles[w].warmup.remote() for w in workers], timeout=ready_timeout_s)
        endpoints = ray.get([handles[w].endpoint.remote() for w in workers], timeout=ready_timeout_s)
        return {w: WorkerRef(w, handle=handles[w], endpoint=e) for w, e in zip(workers, endpoints)}

    def replace(self, worker_id: str, groups: tuple[int, ...], failed: WorkerRef | None = None) -> WorkerRef:
        """A live worker under `worker_id` holding `groups`: the same actor if it answers a ping
        at once, else a new one. The actor whose calls failed (`failed`), when it does not answer,
        is hung (SIGSTOP, a wedged device): killed rather than waited for. Another actor under the
        name (a replacement someone else started) is waited for. The dead actor's name frees up
        shortly after it dies, hence the retries."""
        error: Exception | None = None
        for attempt in range(REPLACE_ATTEMPTS):
            try:
                handle = self._live_or_fresh(worker_id, failed)
                ray.get(handle.load_groups.remote(list(groups)), timeout=READY_TIMEOUT_S)
                ray.get(handle.warmup.remote(), timeout=READY_TIMEOUT_S)
                log.warning("expert worker %s replaced (groups %s)", worker_id, list(groups))
                return WorkerRef(worker_id, handle=handle, endpoint=ray.get(handle.endpoint.remote(), timeout=60))
            except Exception as exc:  # noqa: BLE001 - retried with backoff, reported if all fail
                error = exc
                time.sleep(0.2 * 2**attempt)
        raise RuntimeError(f"could not replace expert worker {worker_id}: {error}") from error

    def _live_or_fresh(self, worker_id: str, failed: WorkerRef | None):
        try:
            handle = self.fleet.handle(worker_id)
        except ValueError:
            handle = None
        if handle is not None:
            hung = failed is not None and failed.handle == handle  # the very actor whose calls failed
            try:
                ray.get(handle.ping.remote(), timeout=HUNG_PING_S if hung else READY_TIMEOUT_S)
                return handle
            except ray.exceptions.GetTimeoutError:
                log.warning("expert worker %s does not answer: killed, a new one takes its place", worker_id)
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001 - dead: a new one takes the name once it is free
                pass
        return self.fleet.start(worker_id)

    def stop(self, workers: list[str]) -> None:
        for w in workers:
            self.fleet.stop(w)
