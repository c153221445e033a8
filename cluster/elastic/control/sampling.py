"""Worker stats -> metric samples: each period the controller reads every serving worker's
cumulative counters and stores the difference since its last look as one WorkerSample, which the
policies read through the metrics window (cluster/elastic/metrics_window.py).

The same read is the controller's liveness probe: every worker is asked at once and waited for
one latency-derived deadline (control/liveness.py); those that did not answer are the `suspects`
the repair pings once more. A worker that answers from a new process (replaced under its id, e.g.
by a replica) is reported through `on_new_pid` so its record shows the live pid, and its counters
start from zero again instead of going negative."""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import ray

from cluster.elastic.control.liveness import HangDeadline
from cluster.elastic.metrics_window import WorkerSample
from cluster.elastic.store import ElasticStore
from cluster.elastic.worker_fleet import WorkerFleet

log = logging.getLogger(__name__)


class WorkerSampler:
    def __init__(self, store: ElasticStore, fleet: WorkerFleet, clock: Callable[[], float],
                 deadline: HangDeadline | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.fleet = fleet
        self.clock = clock
        self.deadline = deadline or HangDeadline()
        self.monotonic = monotonic
        self.last: dict[str, dict] = {}  # worker id -> its counters at the last look, with "_at"
        self.suspects: set[str] | None = None  # workers that did not answer the last collect; None: none yet
        self.on_new_pid: Callable[[dict[str, int]], None] = lambda pids: None

    def fresh(self, wid: str) -> None:
        """A fresh worker's counters start at zero: count its first interval instead of using it as
        a baseline, or the per-group token windows undercount (and show MoGE as imbalanced)."""
        self.last[wid] = {"tokens": 0, "busy_s": 0.0, "group_tokens": {}, "_at": self.clock()}

    def collect(self, workers: Iterable[str]) -> set[str]:
        """Sample every worker in parallel; -> the ones that did not answer within the deadline."""
        workers = list(workers)
        answers = self._ask(workers, "stats")
        for wid, s in answers.items():
            self._record(wid, s)
        pids = {w: int(s["pid"]) for w, s in answers.items() if s.get("pid") is not None}
        if pids:
            try:
                self.on_new_pid(pids)
            except Exception as e:  # noqa: BLE001 - the record's pid is informational
                log.info("worker pid refresh failed: %s", e)
        self.suspects = {w for w in workers if w not in answers}
        return self.suspects

    def _ask(self, workers: list[str], method: str) -> dict[str, dict]:
        """Call `method` on every worker at once, wait one deadline for all: {worker: answer}."""
        refs = {}
        for wid in workers:
            try:
                refs[getattr(self.fleet.handle(wid), method).remote()] = wid
            except Exception:  # noqa: BLE001 - no such actor: it does not answer
                continue
        answers: dict[str, dict] = {}
        start = self.monotonic()
        limit = self.deadline.seconds()
        pending = list(refs)
        while pending:
            left = limit - (self.monotonic() - start)
            if left <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in ready:
                try:
                    answers[refs[ref]] = ray.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - a dead actor answers with its error
                    continue
                self.deadline.record(self.monotonic() - start)
        return answers

    def unanswered(self, workers: list[str]) -> list[str]:
        """Those of `workers` that do not answer one ping within the deadline (all pinged at once)."""
        answers = self._ask(list(workers), "ping")
        return [w for w in workers if w not in answers]

    def sample_last(self, wid: str) -> None:
        """A worker about to be stopped: record what it did since the last sample."""
        try:
            self.sample(wid)
        except Exception as e:  # noqa: BLE001 - metrics never block a scale-down
            log.info("last sample of %s failed: %s", wid, e)
        self.last.pop(wid, None)

    def sample(self, wid: str) -> None:
        try:
            s = ray.get(self.fleet.handle(wid).stats.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - a dead worker shows up in repair
            return
        self._record(wid, s)

    def _record(self, wid: str, s: dict) -> None:
        now = self.clock()
        prev = self.last.get(wid)
        self.last[wid] = {**s, "_at": now}
        if prev is None:
            return  # first look after a controller restart: a baseline only
        if prev.get("pid") is not None and s.get("pid") is not None and prev["pid"] != s["pid"]:
            prev = {"tokens": 0, "busy_s": 0.0, "group_tokens": {}, "_at": prev["_at"]}  # a new process
        interval = max(now - prev["_at"], 1e-6)
        groups = {int(g): int(n) - int(prev["group_tokens"].get(g, 0)) for g, n in s["group_tokens"].items()}
        self.store.add_worker_sample(WorkerSample(
            wid, now, interval, tokens=int(s["tokens"]) - int(prev["tokens"]),
            busy_s=float(s["busy_s"]) - float(prev["busy_s"]),
            step_ms=(1000.0 * float(s.get("step_latency_s", 0.0)),), group_tokens=groups))
