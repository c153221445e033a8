"""Failover and retry, for every carrier (DESIGN invariant 4: a failed call is sent again, per group,
and the request goes on).

A group whose call failed (or whose link failed mid-step) goes, in this order, to
  another live holder in the current epoch;
  a live, connected holder in the staged epoch (the controller loads and warms a group before it
  publishes, so the weights are the same; routing for the step still follows the current epoch);
  the local fallback, when the replica has one (the product always does): an in-process worker
  reading the group from the checkpoint, while a replacement starts in the background;
  otherwise the replacement itself, or a staged holder if one appears while it starts.

The local fallback never loads weights on the step thread: loads run on their own thread, started
at start-up for every group when it is warm, else for a worker's groups the moment it is marked
down, so a retry waits at most for a load already under way. The replacement (`replacer`) is a
function of the cluster's (cluster/replica/workers.py): told which ref's calls failed, it kills that
actor rather than wait on it.

Shape legend: T' = rows of the call, D = hidden, K = slots per token, n = groups.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

from actors.experts.carriers.base import WorkerRef
from actors.experts.local_holder import LOCAL

log = logging.getLogger(__name__)

FALLBACK = "<fallback>"  # the pseudo-holder of groups computed by the local fallback (never in a placement)
# replacer(worker_id, groups, failed) -> a WorkerRef holding `groups`, ready to be connected;
# `failed`: the ref whose calls failed (a replacer tells that actor apart from a newer one)
Replacer = Callable[[str, tuple[int, ...], WorkerRef | None], WorkerRef]


class ExpertCallFailed(RuntimeError):
    """Every holder and replacement of a group failed within the retry budget."""


class LocalFallback:
    def __init__(self, worker: Any, n_groups: int, warm: bool = False, wait_s: float = 60.0) -> None:
        self.worker = worker  # ExpertWorker-like: load_groups(groups), compute(...), held_groups()
        self.wait_s = wait_s
        self.calls = 0  # group calls computed here (metric)
        self._ready: dict[int, Future] = {}
        self._lock = threading.Lock()
        if warm:
            self.prepare(range(n_groups))

    def prepare(self, groups) -> None:
        """Start loading `groups` (those not loaded or loading yet) on a thread of their own."""
        with self._lock:
            new = [int(g) for g in groups if int(g) not in self._ready]
            futures = {g: Future() for g in new}
            self._ready.update(futures)
        if not new:
            return

        def load() -> None:
            try:
                self.worker.load_groups(new)
                for fut in futures.values():
                    fut.set_result(True)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits; the next prepare retries
                with self._lock:
                    for g in new:
                        self._ready.pop(g, None)
                for fut in futures.values():
                    fut.set_exception(exc)

        threading.Thread(target=load, name="moge-fallback-load", daemon=True).start()

    def compute(self, layer: int, groups: list[int], x, ids, weights) -> torch.Tensor:
        self.prepare(groups)
        for g in groups:
            self._ready[g].result(timeout=self.wait_s)
        self.calls += 1
        return self.worker.compute(layer, list(groups), x, ids, weights)


class Failover:
    def __init__(self, dispatcher, replacer: Replacer | None, fallback: LocalFallback | None,
                 max_attempts: int = 3, restage_poll_s: float = 0.05) -> None:
        self.d = dispatcher
        self.replacer, self.fallback = replacer, fallback
        self.max_attempts, self.restage_poll_s = max_attempts, restage_poll_s
        self.retries = 0  # group calls re-sent after a failure (metric)
        # replacements in flight: close() waits for them, so none starts a worker after its replica
        # is gone (a stray actor the next deployment in the namespace would find by name)
        self._threads: set[threading.Thread] = set()
        self._closed = threading.Event()
        self._replacing: set[str] = set()
        self._lock = threading.Lock()

    # ---- where a group goes ------------------------------------------------------------------

    def holder_for(self, g: int) -> str:
        """A holder for a group none of whose current holders is live."""
        holders = self.d.placement.holders_of(g)
        staged = self.staged_holder(g)
        if staged is not None:
            return staged
        if self.fallback is not None:
            self.replace_in_background(holders[0])
            return FALLBACK
        return self._replace_unless_restaged(holders[0], g)

    def alternative(self, g: int) -> str:
        for holder in self.d.placement.holders_of(g):
            if not self.d.liveness.is_down(holder):
                return holder
        return self.holder_for(g)

    def staged_holder(self, g: int) -> str | None:
        """A live, connected holder of `g` in the staged (not yet current) epoch."""
        staged = self.d.staged_placement()
        if staged is None:
            return None
        connected = set(self.d.carrier.connected())
        for holder in staged.holders_of(g):
            if holder != LOCAL and not self.d.liveness.is_down(holder) and holder in connected:
                return holder
        return None

    def worker_down(self, worker_id: str) -> None:
        """A worker was just marked down: its groups start loading into the fallback, and its
        replacement starts, neither on this (the step's) thread."""
        if self.fallback is not None:
            self.fallback.prepare(self.d.placement.groups_of(worker_id))
            self.replace_in_background(worker_id)

    # ---- computing a group somewhere else -----------------------------------------------------

    def compute_on(self, target: str, layer: int, groups: list[int], x, ids, weights) -> torch.Tensor:
        """[n, T', D] of `groups` from `target` (a worker, the replica's own groups or the fallback)."""
        if target == FALLBACK:
            return self.fallback.compute(layer, groups, x, ids, weights)
        if target == LOCAL:
            return self.d.local.partials(layer, x, ids, weights, groups)
        sent = self.d.send(target, layer, groups, x, ids, weights)
        return sent.future.result(timeout=self.d.liveness.left(sent.deadline))

    def retry(self, layer: int, g: int, x, ids, weights, first_error: Exception) -> torch.Tensor:
        """[T', D]: group g's partial from the first holder that answers."""
        mine = torch.where(ids // self.d.cfg.experts_per_group == g, ids, -1)  # only this group's slots
        error: Exception = first_error
        for _ in range(self.max_attempts):
            self.retries += 1
            target = None
            try:
                target = self.alternative(g)
                return self.compute_on(target, layer, [g], x, mine, weights)[0]
            except Exception as exc:  # noqa: BLE001 - no holder found (target None) or it failed too
                error = exc
                if target not in (None, FALLBACK, LOCAL):
                    self.d.mark_down(target)
                if target == FALLBACK:
                    break  # the replica's own copy failed: nothing else to try
        raise ExpertCallFailed(
            f"layer {layer} group {g}: no holder answered after {self.max_attempts} attempts: {error}"
        ) from error

    # ---- replacements --------------------------------------------------------------------------

    def _replace_unless_restaged(self, worker_id: str, g: int) -> str:
        """A replacement may wait long for a free device; meanwhile the controller's repair can
        publish an epoch that moves the group to a live worker. Whichever comes first wins (a
        replacement that finishes later is simply not used and the controller retires it)."""
        box: Future = Future()

        def replace() -> None:
            try:
                box.set_result(self._replace(worker_id))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting step
                box.set_exception(exc)

        self._spawn(replace, worker_id)
        while True:
            try:
                return box.result(timeout=self.restage_poll_s)
            except TimeoutError:
                holder = self.staged_holder(g)
                if holder is not None:
                    return holder

    def replace_in_background(self, worker_id: str) -> None:
        """Start (once at a time per worker) a replacement; the step does not wait for it."""
        if self.replacer is None:
            return
        with self._lock:
            if worker_id in self._replacing:
                return
            self._replacing.add(worker_id)

        def replace() -> None:
            try:
                self._replace(worker_id)
            except BaseException as exc:  # noqa: BLE001 - the controller's repair may win instead (or
                # the process is shutting Ray down under this thread)
                log.warning("background replacement of %s failed: %s", worker_id, exc)
            finally:
                with self._lock:
                    self._replacing.discard(worker_id)

        self._spawn(replace, worker_id)

    def _spawn(self, target, worker_id: str) -> None:
        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=f"replace-{worker_id}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """No replacement starts from now on; wait (bounded) for those in flight."""
        self._closed.set()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _replace(self, worker_id: str) -> str:
        """A replacement of `worker_id` holding its groups, connected under the same id."""
        if self.replacer is None:
            raise ExpertCallFailed(f"worker {worker_id}: every holder failed and no replacer is configured")
        if self._closed.is_set():
            raise ExpertCallFailed(f"worker {worker_id}: not replaced, the dispatcher is closed")
        ref = self.replacer(worker_id, self.d.placement.groups_of(worker_id), self.d.workers.get(worker_id))
        self.d.replaced(ref)
        return worker_id
