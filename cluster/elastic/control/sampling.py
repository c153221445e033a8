"""Worker stats -> metric samples: each period the controller reads every serving worker's
cumulative counters and stores the difference since its last look as one WorkerSample, which the
policies read through the metrics window (cluster/elastic/metrics_window.py)."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import ray

from cluster.elastic.metrics_window import WorkerSample
from cluster.elastic.store import ElasticStore
from cluster.elastic.worker_fleet import WorkerFleet

log = logging.getLogger(__name__)


class WorkerSampler:
    def __init__(self, store: ElasticStore, fleet: WorkerFleet, clock: Callable[[], float]) -> None:
        self.store = store
        self.fleet = fleet
        self.clock = clock
        self.last: dict[str, dict] = {}  # worker id -> its counters at the last look, with "_at"

    def fresh(self, wid: str) -> None:
        """A fresh worker's counters start at zero: count its first interval instead of using it as
        a baseline, or the per-group token windows undercount (and show MoGE as imbalanced)."""
        self.last[wid] = {"tokens": 0, "busy_s": 0.0, "group_tokens": {}, "_at": self.clock()}

    def collect(self, workers: Iterable[str]) -> None:
        for wid in workers:
            self.sample(wid)

    def sample_last(self, wid: str) -> None:
        """A worker about to be stopped: record what it did since the last sample."""
        try:
            self.sample(wid)
        except Exception as e:  # noqa: BLE001 - metrics never block a scale-down
            log.info("last sample of %s failed: %s", wid, e)
        self.last.pop(wid, None)

    def sample(self, wid: str) -> None:
        now = self.clock()
        try:
            s = ray.get(self.fleet.handle(wid).stats.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a dead worker shows up in repair
            return
        prev = self.last.get(wid)
        self.last[wid] = {**s, "_at": now}
        if prev is None:
            return  # first look after a controller restart: a baseline only
        interval = max(now - prev["_at"], 1e-6)
        groups = {int(g): int(n) - int(prev["group_tokens"].get(g, 0)) for g, n in s["group_tokens"].items()}
        self.store.add_worker_sample(WorkerSample(
            wid, now, interval, tokens=int(s["tokens"]) - int(prev["tokens"]),
            busy_s=float(s["busy_s"]) - float(prev["busy_s"]),
            step_ms=(1000.0 * float(s.get("step_latency_s", 0.0)),), group_tokens=groups))
