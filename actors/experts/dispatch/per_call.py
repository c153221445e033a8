"""The per-call path of the dispatcher: per MoE layer one call per holder slot of the route, all
sent at once over the per-call carrier (in process, gRPC, collective), the replica's own groups
computed while they are away, then every group's partials added in group order.

  MoGE      every token hits every group: x goes to every holder whole, with the ids of the
            routing slots it does not serve set to -1 (the route's device mask; no host sync).
  top-k     each holder gets the rows that hit its groups (one host sync per layer finds them).
  replicas  a group held by R live holders has its rows split into R contiguous ranges.

Every call's deadline is fixed when it is sent, and a call to a worker already marked down is not
waited for at all (Liveness). A failed call's groups are retried one by one (Failover).

Shape legend: T = tokens of the layer, D = hidden, K = slots per token, S = holder slots,
T' = rows of one call, n = groups of one call.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass
import torch

from actors.experts.dispatch.combine import GroupParts
from actors.experts.dispatch.failover import FALLBACK, ExpertCallFailed
from actors.experts.dispatch.route_table import RouteTable
from actors.experts.local_holder import LOCAL

log = logging.getLogger(__name__)


@dataclass
class Sent:
    worker: str
    groups: list[int]
    rows: torch.Tensor | None  # [T'] rows of the layer's x in this call; None = all rows, in order
    x: torch.Tensor  # [T', D]
    ids: torch.Tensor  # [T', K] global expert ids, -1 for slots not sent to this worker
    weights: torch.Tensor  # [T', K]
    future: "Future[torch.Tensor]"  # -> [n, T', D]
    deadline: float  # fixed when sent


def done(value: torch.Tensor) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class PendingCalls:
    def __init__(self, path: "PerCallPath", layer: int, x: torch.Tensor, calls: list[Sent], parts: GroupParts) -> None:
        self.path, self.layer, self.x, self.calls, self.parts = path, layer, x, calls, parts

    def collect(self) -> GroupParts:
        for call in self.calls:
            self.path.collect(self.layer, call, self.parts)
        self.calls = []
        return self.parts

    def wait(self) -> torch.Tensor:
        return self.collect().sum(self.x)


class PerCallPath:
    def __init__(self, dispatcher) -> None:
        self.d = dispatcher  # the Dispatcher this path belongs to (its placement, liveness, failover)

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 route: RouteTable, only: list[int] | None = None, into: GroupParts | None = None) -> PendingCalls:
        """Calls for every group (or the groups `only`): the route's holders, and a failover holder
        for each group the route cannot reach. `into`: add the partials there."""
        d, cfg = self.d, self.d.cfg
        t = x.shape[0]
        moge = cfg.family == "moge"
        wanted = set(range(cfg.n_groups) if only is None else only)
        slot_of = None if route.whole else route.slot_of(ids)  # [T, K]
        if moge:
            hit_groups, slot_rows = wanted, None
            if only is None:
                d.load.record(layer, [t] * cfg.n_groups, t)
        else:  # rows per slot and tokens per group, in one host sync
            hit_groups, slot_rows = self._topk_hits(layer, ids, slot_of, route, wanted, only is None)
        calls: list[Sent] = []
        local: list[tuple] = []
        for s, holder in enumerate(route.slots):
            groups = [g for g in route.groups_of[s] if g in hit_groups]
            if not groups:
                continue
            rows = None if route.whole or (moge and not route.split) else self._rows_of(slot_of, s, slot_rows)
            if rows is not None and rows.numel() == 0:
                continue
            mine = route.masked(ids, slot_of, s)
            xs, ms, ws = (x, mine, weights) if rows is None else (x[rows], mine[rows], weights[rows])
            if holder == LOCAL:
                local.append((groups, rows, xs, ms, ws))
                continue
            calls.append(d.send(holder, layer, groups, xs, ms, ws, rows))
        for g in [g for g in route.unrouted if g in hit_groups]:
            calls.append(self._failover_call(layer, g, x, ids, weights))
        parts = into if into is not None else GroupParts()
        for groups, rows, xs, ms, ws in local:  # the replica's own groups while the calls are away
            parts.add_all(groups, d.local.partials(layer, xs, ms, ws, groups), rows)
        return PendingCalls(self, layer, x, calls, parts)

    def _topk_hits(self, layer, ids, slot_of, route, wanted, record: bool):
        cfg = self.d.cfg
        t = ids.shape[0]
        group_of = ids // cfg.experts_per_group
        hits = torch.zeros(t, cfg.n_groups, dtype=torch.bool, device=ids.device)
        hits.scatter_(1, group_of, True)  # [T, G]
        slot_rows = None
        if slot_of is not None:
            slot_rows = torch.zeros(t, len(route.slots) + 1, dtype=torch.bool, device=ids.device)
            slot_rows.scatter_(1, slot_of + 1, True)  # column 0 = unrouted
            slot_rows = slot_rows[:, 1:]  # [T, S]
        counts = hits.sum(0).tolist()  # the layer's one host sync
        if record:
            self.d.load.record(layer, counts, t)
        return {g for g, n in enumerate(counts) if n and g in wanted}, slot_rows

    @staticmethod
    def _rows_of(slot_of, s: int, slot_rows) -> torch.Tensor:
        """[T'] rows with at least one routing slot served by slot s."""
        mask = slot_rows[:, s] if slot_rows is not None else (slot_of == s).any(1)
        return mask.nonzero().squeeze(1)

    def _failover_call(self, layer: int, g: int, x, ids, weights) -> Sent:
        """A group with no live holder in the route: its failover holder, this layer."""
        d = self.d
        mine = torch.where(ids // d.cfg.experts_per_group == g, ids, -1)
        target = d.failover.holder_for(g)
        if target in (FALLBACK, LOCAL):
            try:
                fut = done(d.failover.compute_on(target, layer, [g], x, mine, weights))
            except Exception as exc:  # noqa: BLE001 - reaches the waiter like a failed remote call
                fut = Future()
                fut.set_exception(exc)
            return Sent(target, [g], None, x, mine, weights, fut, d.liveness.clock())
        return d.send(target, layer, [g], x, mine, weights)

    def collect(self, layer: int, call: Sent, parts: GroupParts) -> None:
        d = self.d
        down = call.worker not in (FALLBACK, LOCAL) and d.liveness.is_down(call.worker)
        try:
            if down and not call.future.done():
                raise TimeoutError(f"expert worker {call.worker} is down")  # no wait at all
            y = call.future.result(timeout=d.liveness.left(call.deadline))  # [n, T', D]
            parts.add_all(call.groups, y, call.rows)
        except Exception as exc:  # noqa: BLE001 - any failure of the call, or past its deadline: re-send
            if call.worker == FALLBACK:
                raise ExpertCallFailed(f"layer {layer}: the local fallback failed: {exc}") from exc
            if isinstance(exc, TimeoutError) and not down:
                log.warning("expert worker %s did not answer within its deadline: marked down", call.worker)
            d.mark_down(call.worker)
            for g in call.groups:
                parts.add(g, d.failover.retry(layer, g, call.x, call.ids, call.weights, exc), call.rows)
