"""RemoteExperts: the attention replica's ExpertCompute when the routed experts live on expert
workers. Per MoE layer it splits the work by group per the current Placement, sends one call per
holder (all at once), and adds the per-group partials back in group order — the order LocalExperts
uses, so the sums (and greedy tokens) match the single-process model.

  MoGE      every token hits every group: x is broadcast, each holder gets its groups' slots.
  top-k     the tokens that hit a group are gathered for its holders and scattered back.
  replicas  a group held by R workers has its tokens split into R contiguous chunks.

Invariant 2: `adopt(placement)` only stages a placement; `on_step_boundary()` (called by the engine
between steps) makes it current. Invariant 4: a call that fails is re-sent to another holder of the
group, or to a replacement worker from `replacer`, inside the same step.

Hung (not dead) workers: every call waits at most a deadline derived from recent call latency
(`deadline_factor` x the slowest of the last calls, at least `min_deadline_s`, at most
`wait_timeout_s`), so a stopped worker costs one deadline, not the transport's 30 s timeout. Past
it the worker is marked down and the call goes to another holder; when a group has no live holder
and a `local_fallback` is given (an in-process ExpertWorker that loads groups from the checkpoint
on first use; unlike the placement's "local" holder it is never in a placement), the replica
computes the group itself — the same code and weights as a worker, so the tokens are the same —
while the replacement (`replacer`, in the background) or the controller's repair restores a
remote holder.

Shape legend: T = tokens of the layer, D = hidden, K = slots per token, G = groups,
T' = rows of one call, k = slots of one call, n = groups of one call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from actors.model.expert_compute import PendingExperts
from actors.experts.group_load import GroupLoad
from actors.experts.local_holder import LOCAL, LocalHolder
from actors.model.config import ModelConfig
from actors.experts.placement import Placement, split_rows
from actors.experts.transport.base import ExpertTransport, WorkerRef

log = logging.getLogger(__name__)

# replacer(worker_id, groups) -> a WorkerRef holding `groups`, ready to be connected
Replacer = Callable[[str, tuple[int, ...]], WorkerRef]
FALLBACK = "<fallback>"  # the pseudo-worker of groups computed by the local fallback (never in a placement)
LATENCY_SAMPLES = 64  # calls the deadline looks back on
MIN_SAMPLES = 8  # below this many, a call waits the full wait_timeout_s (cold start, warm-up)


class ExpertCallFailed(RuntimeError):
    """Every holder and replacement of a group failed within the retry budget."""


@dataclass
class _Call:
    worker: str
    groups: list[int]
    rows: torch.Tensor | None  # [T'] rows of the layer's x in this call; None = all rows, in order
    x: torch.Tensor  # [T', D]
    ids: torch.Tensor  # [T', k] global expert ids, -1 for slots not sent to this worker
    weights: torch.Tensor  # [T', k]
    future: "Future[torch.Tensor]"  # -> [n, T', D]
    sent_at: float = field(default_factory=time.monotonic)


class _PendingRemote:
    def __init__(self, owner: "RemoteExperts", layer: int, x: torch.Tensor, calls: list[_Call],
                 local: dict[int, torch.Tensor] | None = None) -> None:
        self.owner, self.layer, self.x, self.calls = owner, layer, x, calls
        self.local = local or {}  # {g: [T, D]} partials of groups held in this process

    def wait(self) -> torch.Tensor:
        x = self.x
        parts: dict[int, list[tuple[torch.Tensor | None, torch.Tensor]]] = {
            g: [(None, partial)] for g, partial in self.local.items()}
        for call in self.calls:
            for g, rows, partial in self.owner._collect(self.layer, call):
                parts.setdefault(g, []).append((rows, partial))
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
        for g in sorted(parts):
            for rows, partial in parts[g]:
                if rows is None:
                    out += partial.float()
                else:
                    out.index_add_(0, rows, partial.float())
        return out.to(x.dtype)


class RemoteExperts:
    def __init__(
        self,
        cfg: ModelConfig,
        transport: ExpertTransport,
        placement: Placement,
        workers: dict[str, WorkerRef],
        replacer: Replacer | None = None,
        max_attempts: int = 3,
        wait_timeout_s: float = 60.0,
        restage_poll_s: float = 0.05,
        local: LocalHolder | None = None,
        local_fallback: Any = None,
        min_deadline_s: float = 1.5,
        deadline_factor: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if placement.n_groups != cfg.n_groups:
            raise ValueError(f"placement has {placement.n_groups} groups, the model {cfg.n_groups}")
        self.cfg = cfg
        self.transport = transport
        self.replacer = replacer
        self.max_attempts = max_attempts
        self.wait_timeout_s = wait_timeout_s
        self.restage_poll_s = restage_poll_s  # how often a step waiting on a replacement looks for a new epoch
        self.local_fallback = local_fallback  # ExpertWorker-like: load_groups(groups), compute(...)
        self.min_deadline_s = min_deadline_s
        self.deadline_factor = deadline_factor
        self.clock = clock
        self.local_calls = 0  # group calls computed by the local fallback (metric)
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._replacing: set[str] = set()
        self.load = GroupLoad(cfg.n_groups)
        self.retries = 0  # calls re-sent after a failure (metric)
        self._placement = placement
        self._staged: tuple[Placement, dict[str, WorkerRef]] | None = None
        self._workers = dict(workers)
        self._down: set[str] = set()  # failed workers, avoided until replaced or a new placement
        self._lock = threading.Lock()
        self.local = local  # groups this replica computes in process (holder id LOCAL)
        for worker_id in _remote(placement.workers):
            self.transport.connect(self._workers[worker_id])

    # ---- placement epochs (invariant 2) ------------------------------------------------------------

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def epoch(self) -> int:
        return self._placement.epoch

    def adopt(self, placement: Placement, workers: dict[str, WorkerRef] | None = None) -> None:
        """Stage `placement`; new workers are connected now, off the step path. It becomes current
        at the next on_step_boundary()."""
        if placement.n_groups != self.cfg.n_groups:
            raise ValueError(f"placement has {placement.n_groups} groups, the model {self.cfg.n_groups}")
        refs = {**self._workers, **(workers or {})}
        missing = [w for w in _remote(placement.workers) if w not in refs]
        if missing:
            raise ValueError(f"placement epoch {placement.epoch} names unknown workers {missing}")
        if LOCAL in placement.workers and self.local is None:
            raise ValueError(f"placement epoch {placement.epoch} holds groups locally but this replica has no LocalHolder")
        for worker_id in _remote(placement.workers):
            if worker_id not in self.transport.connected() or (workers and worker_id in workers):
                self.transport.connect(refs[worker_id])
        with self._lock:
            self._staged = (placement, refs)

    def on_step_boundary(self) -> int:
        """Make a staged placement current; -> the epoch in force (what this replica acknowledges)."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            placement, refs = staged
            unused = set(self._placement.workers) - set(placement.workers)
            self._placement = placement
            self._workers = {w: refs[w] for w in _remote(placement.workers)}
            self._down &= set(placement.workers)
            if self.local is not None:
                self.local.commit()  # the groups this epoch holds in process (staged by the listener)
            for worker_id in _remote(unused):
                self.transport.disconnect(worker_id)
        return self._placement.epoch

    # ---- dispatch --------------------------------------------------------------------------------

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingExperts:
        t = x.shape[0]
        n_groups = self.cfg.n_groups
        group_of = topk_ids // self.cfg.experts_per_group  # [T, K]
        hits = torch.zeros(t, n_groups, dtype=torch.bool, device=x.device)
        hits.scatter_(1, group_of, True)  # [T, G]: token t sends at least one slot to group g
        counts = hits.sum(0).tolist()  # one host sync per layer
        self.load.record(layer, counts, t)

        plan: dict[str, list[tuple[int, torch.Tensor | None]]] = {}
        local: list[int] = []
        for g, n in enumerate(counts):
            if n == 0:
                continue
            if LOCAL in self._placement.holders_of(g):  # in process: never down, never split
                local.append(g)
                continue
            holders = self._live_holders_or_fallback(g)
            rows = None if n == t else hits[:, g].nonzero().squeeze(1)
            if len(holders) == 1:
                plan.setdefault(holders[0], []).append((g, rows))
                continue
            if rows is None:
                rows = torch.arange(t, device=x.device)
            for holder, (a, b) in zip(holders, split_rows(n, len(holders))):
                if b > a:
                    plan.setdefault(holder, []).append((g, rows[a:b]))
        calls = [self._send(layer, w, entries, x, topk_ids, topk_weights, group_of) for w, entries in plan.items()]
        # local groups computed while the remote calls are in flight
        parts = self.local.partials(layer, x, topk_ids, topk_weights, local) if local else None
        return _PendingRemote(self, layer, x, calls, parts)

    def _live_holders_or_fallback(self, g: int) -> list[str]:
        if self.local_fallback is not None:
            holders = self._placement.holders_of(g)
            live = [h for h in holders if h not in self._down]
            if live:
                return live
            staged = self._staged_holder(g)
            if staged is not None:
                return [staged]
            self._replace_in_background(holders[0])
            return [FALLBACK]
        return self._live_holders(g)

    def _live_holders(self, g: int) -> list[str]:
        holders = self._placement.holders_of(g)
        live = [h for h in holders if h not in self._down]
        if live:
            return live
        return [self._fallback_holder(g, holders[0])]

    def _send(self, layer, worker, entries, x, topk_ids, topk_weights, group_of) -> _Call:
        groups = [g for g, _ in entries]
        if all(rows is None for _, rows in entries):  # broadcast: every row, these groups' slots
            rows_union = None
            mask = torch.isin(group_of, torch.tensor(groups, device=x.device))  # [T, K]
            xs, ids, weights = x, topk_ids, topk_weights
        else:  # gather: only rows that hit (this worker's share of) its groups
            mask = torch.zeros_like(group_of, dtype=torch.bool)
            for g, rows in entries:
                if rows is None:
                    mask |= group_of == g
                else:
                    mask[rows] |= group_of[rows] == g
            rows_union = mask.any(1).nonzero().squeeze(1)  # [T']
            mask, xs = mask[rows_union], x[rows_union]
            ids, weights = topk_ids[rows_union], topk_weights[rows_union]
        ids, weights = _compact(mask, ids, weights, self._slots_per_row(len(groups), rows_union is None))
        if worker == FALLBACK:
            return _Call(worker, groups, rows_union, xs, ids, weights, self._fallback(layer, groups, xs, ids, weights))
        return _Call(worker, groups, rows_union, xs, ids, weights,
                     self.transport.call(worker, layer, groups, xs, ids, weights))

    def _fallback(self, layer: int, groups: list[int], x, ids, weights) -> "Future[torch.Tensor]":
        """Compute `groups` in this process (loading them from the checkpoint on first use)."""
        out: Future = Future()
        try:
            self.local_fallback.load_groups(list(groups))
            out.set_result(self.local_fallback.compute(layer, list(groups), x, ids, weights))
            self.local_calls += 1
        except Exception as exc:  # noqa: BLE001 - reaches the waiter like a failed remote call
            out.set_exception(exc)
        return out

    def call_deadline_s(self) -> float:
        """How long one call may take before its worker counts as hung: a multiple of the slowest
        recent call, within [min_deadline_s, wait_timeout_s]."""
        with self._lock:
            recent = list(self._latencies)
        if len(recent) < MIN_SAMPLES:
            return self.wait_timeout_s
        return min(self.wait_timeout_s, max(self.min_deadline_s, self.deadline_factor * max(recent)))

    def _slots_per_row(self, n_groups: int, broadcast: bool) -> int | None:
        # MoGE keeps exactly K/G slots per group per token: no host sync needed to size the call.
        if self.cfg.family == "moge" and broadcast:
            return self.cfg.k_per_group * n_groups
        return None

    # ---- results and failures (invariant 4) ----------------------------------------------------------

    def _collect(self, layer: int, call: _Call) -> list[tuple[int, torch.Tensor | None, torch.Tensor]]:
        try:
            remaining = self.call_deadline_s() - (self.clock() - call.sent_at)
            y = call.future.result(timeout=max(0.0, remaining))  # [n, T', D]
            if call.worker != FALLBACK:
                with self._lock:
                    self._latencies.append(self.clock() - call.sent_at)
            return [(g, call.rows, y[i]) for i, g in enumerate(call.groups)]
        except Exception as exc:  # noqa: BLE001 - any failure of the call, or past its deadline: re-send
            if call.worker == FALLBACK:
                raise ExpertCallFailed(f"layer {layer}: the local fallback failed: {exc}") from exc
            if isinstance(exc, TimeoutError):
                log.warning("expert worker %s did not answer within %.2fs: marked down", call.worker,
                            self.call_deadline_s())
            self._mark_down(call.worker)
            return [self._retry(layer, call, g, exc) for g in call.groups]

    def _retry(self, layer: int, call: _Call, g: int, first_error: Exception):
        group_of = call.ids // self.cfg.experts_per_group
        ids = torch.where(group_of == g, call.ids, -1)  # [T', k] only this group's slots
        error: Exception = first_error
        for _ in range(self.max_attempts):
            self.retries += 1
            target = None
            try:
                target = self._alternative(g, call.worker)
                if target == FALLBACK:
                    return g, call.rows, self._fallback(layer, [g], call.x, ids, call.weights).result()[0]
                fut = self.transport.call(target, layer, [g], call.x, ids, call.weights)
                return g, call.rows, fut.result(timeout=self.call_deadline_s())[0]
            except Exception as exc:  # noqa: BLE001 - no holder found (target None) or it failed too
                error = exc
                if target is not None:
                    self._mark_down(target)
        raise ExpertCallFailed(
            f"layer {layer} group {g}: no holder answered after {self.max_attempts} attempts: {error}"
        ) from error

    def _alternative(self, g: int, failed: str) -> str:
        for holder in self._placement.holders_of(g):
            if holder not in self._down:
                return holder
        holders = self._placement.holders_of(g)
        if self.local_fallback is not None:
            return self._live_holders_or_fallback(g)[0]
        return self._fallback_holder(g, failed if failed in holders else holders[0])

    def _fallback_holder(self, g: int, dead: str) -> str:
        """Every holder of `g` in the current epoch is down: a holder in the staged epoch, else
        `dead`'s replacement (or that staged holder, if it appears while the replacement waits)."""
        return self._staged_holder(g) or self._replace_unless_restaged(dead, g)

    def _staged_holder(self, g: int) -> str | None:
        """A live, connected holder of `g` in the staged (not yet current) epoch. Sending one group's
        retry there mid-step is safe: the controller loads and warms a group before publishing
        the epoch, so its weights are the same; routing for the step still follows the current epoch."""
        with self._lock:
            staged = self._staged
        if staged is None:
            return None
        connected = set(self.transport.connected())
        for holder in staged[0].holders_of(g):
            if holder not in self._down and holder in connected:
                return holder
        return None

    def _replace_unless_restaged(self, worker_id: str, g: int) -> str:
        """A replacement may wait long for a free device; meanwhile the controller's repair can
        publish an epoch that moves the group to a live worker. Whichever comes first wins (a
        replacement that finishes later is simply not used and the controller retires it)."""
        box: Future = Future()

        def replace() -> None:
            try:
                box.set_result(self._replace(worker_id, g))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting step
                box.set_exception(exc)

        threading.Thread(target=replace, name=f"replace-{worker_id}", daemon=True).start()
        while True:
            try:
                return box.result(timeout=self.restage_poll_s)
            except TimeoutError:
                holder = self._staged_holder(g)
                if holder is not None:
                    return holder

    def _replace_in_background(self, worker_id: str) -> None:
        """Start (once at a time per worker) a replacement; the step does not wait for it."""
        if self.replacer is None:
            return
        with self._lock:
            if worker_id in self._replacing:
                return
            self._replacing.add(worker_id)
        groups = self._placement.groups_of(worker_id)

        def replace() -> None:
            try:
                self._replace(worker_id, groups[0] if groups else 0)
            except Exception as exc:  # noqa: BLE001 - the controller's repair may win instead
                log.warning("background replacement of %s failed: %s", worker_id, exc)
            finally:
                with self._lock:
                    self._replacing.discard(worker_id)

        threading.Thread(target=replace, name=f"replace-{worker_id}", daemon=True).start()

    def _mark_down(self, worker_id: str) -> None:
        with self._lock:
            self._down.add(worker_id)

    def _replace(self, worker_id: str, g: int) -> str:
        """Ask for a replacement of `worker_id` holding its groups; connect it under the same id."""
        if self.replacer is None:
            raise ExpertCallFailed(f"group {g}: every holder failed and no replacer is configured")
        ref = self.replacer(worker_id, self._placement.groups_of(worker_id))
        self.transport.disconnect(worker_id)
        self.transport.connect(ref)
        with self._lock:
            self._workers[worker_id] = ref
            self._down.discard(worker_id)
        return worker_id

    # ---- metrics and teardown ------------------------------------------------------------------------

    def groups_without_live_holder(self) -> list[int]:
        """Groups every current holder of which has failed (served by failover until repaired)."""
        with self._lock:
            down = set(self._down)
        return [g for g in range(self.cfg.n_groups) if all(h in down for h in self._placement.holders_of(g))]

    def groups_without_live_holder(self) -> list[int]:
        """Groups every current holder of which has failed (served by failover until repaired)."""
        with self._lock:
            down = set(self._down)
        return [g for g in range(self.cfg.n_groups) if all(h in down for h in self._placement.holders_of(g))]

    def metrics(self, reset: bool = False) -> dict:
        """Group load per layer (see actors/experts/group_load.py) + epoch, retries and failed workers."""
        return {**self.load.snapshot(reset), "epoch": self.epoch, "retries": self.retries, "down": sorted(self._down),
                "local_calls": self.local_calls, "call_deadline_s": self.call_deadline_s()}

    def close(self) -> None:
        self.transport.close()
        if self.local is not None:
            self.local.close()


def _remote(workers) -> list[str]:
    """Holders reached over the transport (every holder but the replica itself)."""
    return [w for w in workers if w != LOCAL]


def _compact(mask: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, width: int | None):
    """Keep only the slots in `mask`, moved to the front of each row: [T', K] -> [T', k].
    Dropped slots become id -1 / weight 0 (ignored by the worker)."""
    ids = torch.where(mask, ids, -1)
    weights = torch.where(mask, weights, 0.0)
    k = int(mask.sum(1).max()) if width is None and mask.numel() else (width or 0)
    if k >= mask.shape[1]:
        return ids, weights
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return ids.gather(1, order), weights.gather(1, order)
