"""The per-step path of the dispatcher: whole steps over a StepCarrier (the step lane, the gRPC
stream), one header per link at the step's first MoE layer, then per layer and micro-batch one
message out per link and each link's per-group partials back, added with everything else in
group order (combine.py).

The route is fixed for the step (built at the boundary over the live workers with an open link).
Groups it cannot reach — no live holder with a link, or a link that failed earlier in the step —
go through the per-call path in the same layer (sent at dispatch, so they are in flight with the
links). A link that fails at a layer's wait has that layer's groups re-run per call; a failure seen
only on the device (nccl) makes the step re-run (StepRerun).

Micro-batches: PingPongRunner announces both with begin_step; they share the step's links and
header, and their layers go out in the order dispatched (A0 B0 A1 B1 ...). A first-layer dispatch
nobody announced opens a one-micro-batch step; one that arrives while another step is still open
runs per call (only tests do that).

CUDA graphs (a carrier that is graph_safe, nccl lanes): the model runner captures whole decode
steps per bucket with the links' operations inside; graph_begin checks the captured route and
links are still the ones in force and writes the headers, graph_end polls the device against the
deadline.

Shape legend: T = tokens of a micro-batch, D = hidden, K = slots per token.
"""

from __future__ import annotations

import dataclasses
import torch

from actors.experts.carriers.base import LinkFailed, StepCarrier, StepHeader
from actors.experts.dispatch.combine import GroupParts
from actors.experts.dispatch.route_table import RouteTable
from actors.experts.local_holder import LOCAL
from actors.model.expert_compute import StepRerun
from actors.model.routing import tokens_per_group


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class _Step:
    def __init__(self, route: RouteTable, counts: list[int]) -> None:
        self.route, self.counts = route, counts
        self.headers: dict[str, StepHeader] = {}
        self.failed: set[str] = set()  # links that failed this step (both micro-batches avoid them)
        self.subs: list[_Sub] = []


class _Sub:
    """One micro-batch's pass through the MoE layers of a step."""

    def __init__(self, step: _Step | None, mb: int, t: int) -> None:
        self.step, self.mb, self.t = step, mb, t
        self.started = False
        self.next_layer = -1


class _PendingLayer:
    def __init__(self, path: "StepPath", sub: _Sub, layer: int, x, ids, weights, deadline, calls, last: bool) -> None:
        self.path, self.sub, self.layer, self.x, self.ids, self.weights = path, sub, layer, x, ids, weights
        self.deadline, self.calls, self.last = deadline, calls, last

    def wait(self) -> torch.Tensor:
        return self.path.finish(self)


class StepPath:
    def __init__(self, dispatcher, carrier: StepCarrier) -> None:
        self.d, self.carrier = dispatcher, carrier
        cfg = dispatcher.cfg
        self.moe_layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]
        self._next = dict(zip(self.moe_layers, self.moe_layers[1:] + [-1]))
        self.route: RouteTable | None = None
        self._step: _Step | None = None
        self._announced: list[int] | None = None
        self._subs: list[_Sub] = []
        self._load: list[tuple[int, torch.Tensor, int]] = []  # top-k (layer, [G] device counts, T) until the boundary
        self.link_failures = 0
        self._plans: dict = {}
        self._capture: dict | None = None
        self._inflight: tuple | None = None
        self.graph_replays = 0
        self.graph_stale = 0

    # ---- steps -----------------------------------------------------------------------------------

    def at_boundary(self) -> None:
        self._sync()
        self._step, self._announced, self._subs = None, None, []
        self.flush_load()

    def _sync(self) -> None:
        """Links to the live workers of the placement in force, and the step route over them."""
        d = self.d
        down = d.liveness.down()
        live = {w: d.workers[w] for w in d.placement.workers if w != LOCAL and w not in down}
        usable = self.carrier.sync(live)
        route = RouteTable(d.cfg, d.placement, usable, d.liveness.version)
        if self.route is not None and self.route.signature() == route.signature():
            # the same routing: keep the table, so its device maps (read by captured steps) stay put
            self.route.epoch, self.route.version = route.epoch, route.version
        else:
            self.route = route

    def begin_step(self, counts: list[int]) -> None:
        counts = [int(c) for c in counts]
        if not counts or len(counts) > 2:
            raise ValueError(f"step path: 1 or 2 micro-batches a step, got {counts}")
        self._announced = counts

    def _first_layer(self, x: torch.Tensor, ids: torch.Tensor) -> _Sub:
        if self.route is None:
            self._sync()
        t = x.shape[0]
        step = self._step
        pending = next((s for s in step.subs if not s.started), None) if step is not None else None
        if pending is None:
            if any(s.next_layer != -1 for s in self._subs):  # another step is open: this one per call
                return self._open(_Sub(None, 0, t))
            counts = self._announced or [t]
            self._announced = None
            if counts[0] != t:  # refused before any header goes out: the links stay in step
                raise RuntimeError(f"step path: micro-batch of {t} tokens, {counts[0]} announced")
            step = self._step = _Step(self.route, counts)
            step.subs = [_Sub(step, mb, c) for mb, c in enumerate(counts)]
            self._start(step, x, ids)
            pending = step.subs[0]
        if pending.t != t:
            raise RuntimeError(f"step path: micro-batch of {t} tokens, {pending.t} announced")
        return self._open(pending)

    def _open(self, sub: _Sub) -> _Sub:
        sub.started = True
        self._subs.append(sub)
        return sub

    def _start(self, step: _Step, x: torch.Tensor, ids: torch.Tensor) -> None:
        route = step.route
        rows = tuple(self.carrier.rows(c) for c in step.counts)
        for s, w in enumerate(route.slots):
            step.headers[w] = StepHeader(self.d.epoch, len(self.moe_layers), tuple(step.counts), rows, x.dtype,
                                         x.shape[1], ids.shape[1], route.groups_of[s], route.whole)
        self._failed(step, self.carrier.start(step.headers))
        if self._capture is not None:
            self._capture["step"] = step

    def dispatch(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        if layer == self.moe_layers[0]:
            sub = self._first_layer(x, ids)
        else:
            sub = next((s for s in self._subs if s.next_layer == layer), None)
            if sub is None:
                raise RuntimeError(f"step path: layer {layer} dispatched outside a step")
        sub.next_layer = self._next[layer]
        last = sub.next_layer == -1
        if last:
            self._subs.remove(sub)
        self._record_load(layer, ids)
        d, step = self.d, sub.step
        if step is None:  # a micro-batch outside the step's links
            return _PendingLayer(self, sub, layer, x, ids, weights, 0.0, d.per_call.dispatch(layer, x, ids, weights,
                                                                                               d.route()), last)
        route = step.route
        slot_of = None if route.whole else route.slot_of(ids)
        links = {w: route.masked(ids, slot_of, s) for s, w in enumerate(route.slots) if w not in step.failed}
        deadline = d.liveness.deadline()  # fixed when sent
        self._failed(step, self.carrier.send(sub.mb, layer, x, links, weights))
        elsewhere = self._elsewhere(step)
        calls = d.per_call.dispatch(layer, x, ids, weights, d.route(), only=elsewhere) if elsewhere else None
        return _PendingLayer(self, sub, layer, x, ids, weights, deadline, calls, last)

    def _elsewhere(self, step: _Step) -> list[int]:
        """Groups this step's links do not serve (now): per call."""
        route = step.route
        gone = {s for s, w in enumerate(route.slots) if w in step.failed}
        return [g for g, hs in enumerate(route.live) if not hs or all(s in gone for s in hs)]

    def finish(self, p: _PendingLayer) -> torch.Tensor:
        sub, x = p.sub, p.x
        step = sub.step
        if step is None:
            return p.calls.wait()
        replies = self.carrier.receive(sub.mb, p.layer, p.deadline, p.last and not _capturing(x))
        t = x.shape[0]
        if step.route.whole and p.calls is None and len(replies) == 1:
            (reply,) = replies.values()
            if not isinstance(reply, LinkFailed):
                return reply[:t].to(x.dtype, copy=True)  # the link's buffer is reused next layer
        parts = p.calls.collect() if p.calls is not None else GroupParts()
        rerun = []
        for w, reply in replies.items():
            groups = step.headers[w].groups
            if isinstance(reply, LinkFailed):
                self._failed(step, {w})
                if reply.device_side:
                    rerun.append(reply)
                    continue
                self.d.per_call.dispatch(p.layer, x, p.ids, p.weights, self.d.route(), list(groups), parts).collect()
            else:
                parts.add_all(groups, reply[:, :t])
        if rerun:
            raise StepRerun(str(rerun[0]))
        return parts.sum(x)

    def _failed(self, step: _Step, workers: set[str]) -> None:
        for w in workers - step.failed:
            step.failed.add(w)
            self.link_failures += 1
            self.d.mark_down(w)

    # ---- group load ------------------------------------------------------------------------------

    def _record_load(self, layer: int, ids: torch.Tensor) -> None:
        t = ids.shape[0]
        if self.d.cfg.family == "moge":  # every token visits every group: nothing to count
            if self._capture is None:  # a replayed step's load is recorded by graph_begin
                self.d.load.record(layer, [t] * self.d.cfg.n_groups, t)
            return
        counts = tokens_per_group(ids, self.d.cfg)  # stays on the device: one copy per step reads them
        (self._capture["load"] if self._capture is not None else self._load).append((layer, counts, t))

    def flush_load(self) -> None:
        if not self._load:
            return
        counts = torch.stack([c for _, c, _ in self._load]).tolist()
        for (layer, _, t), row in zip(self._load, counts):
            self.d.load.record(layer, row, t)
        self._load.clear()

    # ---- CUDA graphs -------------------------------------------------------------------------------

    @property
    def graph_safe(self) -> bool:
        return self.carrier.graph_safe

    def _signature(self):
        route = self.route
        links = self.carrier.signature() if self.carrier.graph_safe else None
        if links is None or route is None or route.split or route.unrouted or not route.slots:
            return None
        return links, route.signature()

    def graph_prepare(self, key, counts: list[int]) -> bool:
        self._step, self._subs, self._announced = None, [], None
        sig = self._signature()
        if sig is None:
            return False
        self.begin_step(counts)
        self._capture = {"key": key, "sig": sig, "load": [], "step": None}
        return True

    def graph_captured(self, key, ok: bool = True) -> None:
        cap, self._capture = self._capture, None
        self._step, self._subs, self._announced = None, [], None
        if ok and cap is not None and cap["key"] == key and cap["step"] is not None:
            self._plans[key] = (cap["sig"], cap["step"].headers, cap["step"].counts, cap["load"])

    def graph_begin(self, key) -> bool:
        plan = self._plans.get(key)
        if plan is None:
            return False
        sig, headers, counts, load = plan
        if self._signature() != sig:
            self.graph_stale += 1
            return False
        self.carrier.write_headers({w: dataclasses.replace(h, epoch=self.d.epoch) for w, h in headers.items()})
        if self.d.cfg.family == "moge":
            for layer in self.moe_layers:
                for t in counts:
                    self.d.load.record(layer, [t] * self.d.cfg.n_groups, t)
        self._inflight = (self.d.liveness.deadline(), plan)
        self.graph_replays += 1
        return True

    def graph_end(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        deadline, (_, headers, _, load) = inflight
        self._load.extend((layer, counts.clone(), t) for layer, counts, t in load)
        try:
            self.carrier.settle(deadline)
        except LinkFailed as exc:  # the re-run opens links again; one to a dead worker fails to open
            self.link_failures += 1
            raise StepRerun(str(exc)) from exc
