"""The step lane, replica side: an ExpertCompute that talks to each expert worker once per step
over a dedicated 2-rank communicator, and per MoE layer moves only device tensors.

    step start   header (int64 [16]) to every worker in the placement: bucket, layers, epoch
    each layer   one packet out per worker (x + routing ids + weights, step_wire.py), one
                 partial back ([Tb, D], already weighted and summed over the worker's groups);
                 the replica adds the workers' partials in placement order.

No gloo control lane, no host copy, no Python request per layer: on nccl every per-layer operation
is asynchronous on the device, so the CPU runs ahead and the same calls can be captured in a CUDA
graph (shapes are fixed per bucket; the header is a device tensor filled before the step).

Dispatch per family (all without a host sync):
  MoGE   broadcast + sum: every worker gets every row; slots of groups it does not serve are
         masked to id -1 on the device.
  top-k  the same fixed-size packet; the worker gathers only its slots (a device-side sort whose
         per-expert counts feed the grouped matmul, actors/model/experts.slot_outputs) and
         scatters their outputs back to rows, so no count ever crosses to the host.
  replicas  a group with R live holders has its rows split into R contiguous ranges.

Micro-batches (ping-pong): PingPongRunner announces both with begin_step; they share ONE lane
(communicator) per worker, one header carries both sizes, and their layers go over it in the
order dispatched, A0 B0 A1 B1 ..., which the worker's loop follows. NCCL matches point-to-point
operations by order only (tags are ignored), and two communicators between the same devices with
operations in flight on both can deadlock (seen on 2x H200 with one lane per slot), so order on
one communicator is the whole protocol. A first-layer dispatch nobody announced opens a single
micro-batch step (on another slot's lane if one is open: gloo tests only); later layers continue
the oldest open sub-step waiting for that layer.

CUDA graphs: on nccl the model runner captures whole decode steps per bucket with every lane op
inside (header send first, then per layer per micro-batch packet out, partial back): see the
graph_* methods. The replica host then spends one header write and one replay a step.

Epochs and failures (DESIGN invariants 2 and 4) stay RemoteExperts' job, which this wraps:
`on_step_boundary` switches the placement and then re-opens lanes; a lane that fails mid-step is
closed, its worker marked down, and the groups it served re-run for that layer and the rest of the
step through RemoteExperts' per-call retry path (another holder, a staged holder or the
replacement). On gloo a dead peer raises at the layer's wait; on nccl failures are asynchronous,
so the last layer of every sub-step polls a device event against the call deadline and a timeout
aborts the lane and raises StepRerun (the model runner runs the step again; KV writes are
idempotent).

Shape legend: T = tokens, Tb = bucket, D = hidden, K = slots per token, G = groups.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid

import torch
import torch.distributed as dist

from actors.experts.remote_experts import RemoteExperts, _Call
from actors.experts.transport.collective import _make_group, abort_group
from actors.experts.transport.rendezvous_auth import prove
from actors.experts.transport.step_wire import (
    HEADER_LEN, OP_CLOSE, OP_HELLO, OP_STEP, bucket, header, new_packet,
)
from actors.model.expert_compute import StepRerun

log = logging.getLogger(__name__)

REPLICA_GRAPHS_ENV = "MOGE_REPLICA_GRAPHS"  # "0": the replica never captures steps over lanes


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto `device` without blocking the host (a pageable copy waits for
    the whole stream, which would stall the CPU mid-step, e.g. at the second micro-batch)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # the pinned block is freed after the copy ran
    return t.to(device)


class LaneFailed(RuntimeError):
    pass


class ReplicaLane:
    """One lane seen from the replica (rank 0)."""

    def __init__(self, ref, slot: int, device: torch.device, timeout_s: float, replica_id: str) -> None:
        self.ref, self.slot, self.device, self.timeout_s = ref, slot, device, timeout_s
        self.worker_id = ref.worker_id
        self.lane_id = f"{replica_id}/{ref.worker_id}/s{slot}/{uuid.uuid4().hex[:8]}"
        info = ref.invoke("accept_lane", self.lane_id, "gloo" if device.type == "cpu" else None, timeout=timeout_s)
        self.backend = info["backend"]
        store = dist.TCPStore(info["host"], int(info["port"]), is_master=False, timeout=_td(timeout_s))
        if self.backend != "gloo":
            torch.cuda.set_device(device)
        self.pg = _make_group(self.backend, dist.PrefixStore(self.lane_id, store), 0, _td(timeout_s))
        self.wire = device if self.backend != "gloo" else torch.device("cpu")
        prove(self.pg, 0, self.wire, _td(timeout_s))  # the cluster secret, before the first header
        # the header's one buffer: eager steps and every captured bucket send from it (static address)
        self.hdr = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
        self.broken: Exception | None = None
        self._bufs: dict[tuple, tuple] = {}
        self._hdr_work = None
        self.send_header(header(OP_HELLO))  # creates the communicator now, not in the first step

    def write_header(self, h: list[int]) -> None:
        """Fill the header buffer (on the current stream) for the next post_header or replay."""
        if self._hdr_work is not None and self.backend != "gloo":
            # nccl sends read `hdr` on the communicator's stream: the overwrite below (on the
            # current stream) must not run before the previous eager header left (e.g. HELLO then
            # STEP). A header sent by a graph replay needs no wait: the replay ended (on the
            # current stream) only after every op in it, the header's send included.
            self._hdr_work.wait()
        self._hdr_work = None
        self.hdr.copy_(_to_device(torch.tensor(h, dtype=torch.int64), self.wire))

    def post_header(self, capturing: bool = False):
        work = self.pg.send([self.hdr], 1, 0)
        if self.backend == "gloo":
            work.wait(_td(self.timeout_s))
        elif not capturing:  # a work made during capture must never be waited on outside it
            self._hdr_work = work
        return work

    def send_header(self, h: list[int]):
        self.write_header(h)
        return self.post_header()

    def buffers(self, tb: int, d: int, k: int, dtype: torch.dtype, reply_dtype: torch.dtype, mb: int = 0):
        """Static per (bucket, shapes, micro-batch): micro-batches on one lane are in flight together."""
        key = (tb, d, k, dtype, reply_dtype, mb)
        if key not in self._bufs:
            reply = torch.empty(tb, d, dtype=reply_dtype, device=self.wire)
            self._bufs[key] = (new_packet(tb, d, k, dtype, self.wire), reply)
        return self._bufs[key]

    def send_layer(self, bufs, x, ids, weights) -> tuple:
        """Post the layer's packet out and partial back; -> the (send, recv) works."""
        packet, reply = bufs
        packet.fill(x, ids, weights)
        return self.pg.send([packet.buf], 1, 1), self.pg.recv([reply], 1, 2)

    def finish_layer(self, bufs, works, deadline: float | None) -> torch.Tensor:
        """The layer's partial [Tb, D] (lane buffer: consume before the next layer)."""
        send, recv = works
        if self.backend == "gloo":
            send.wait(_td(self.timeout_s))
            recv.wait(_td(self.timeout_s))
        else:
            recv.wait()  # the current stream waits on the device; the host does not
            if deadline is not None:
                _await_device(deadline, self.worker_id)
        return bufs[1]

    def close(self) -> None:
        if self.broken is None:
            try:
                work = self.send_header(header(OP_CLOSE))
                if self.backend != "gloo":
                    work.wait()  # the current stream now follows the send, so polling it waits for it:
                    # the abort below would otherwise cancel the CLOSE before the worker read it
                    _await_device(time.monotonic() + min(self.timeout_s, 5.0), self.worker_id)
            except Exception:  # noqa: BLE001 - the worker is gone already
                pass
        self.abort()

    def abort(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None and self.backend != "gloo":
            _abort_bounded(pg, min(self.timeout_s, 10.0))


def _abort_bounded(pg, seconds: float) -> None:
    """Abort a communicator from a helper thread, waiting at most `seconds`: an abort racing a
    kernel stuck on a dead peer was seen hanging (2x H200), and the replica must go on to its
    fallback path rather than hang with it."""
    import threading

    t = threading.Thread(target=abort_group, args=(pg,), name="moge-lane-abort", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        log.warning("step lane: communicator abort still running after %.0f s; going on", seconds)


def _await_device(deadline: float, worker_id: str, spin_s: float = 0.005) -> None:
    """Poll the current stream up to `deadline` (nccl failures never raise on the host). Spins
    for the first `spin_s` (a step usually ends within it; a sleep would add its own wake-up
    latency to every step), then sleeps between polls."""
    ev = torch.cuda.Event()
    ev.record()
    spin_until = time.monotonic() + spin_s
    while not ev.query():
        now = time.monotonic()
        if now > deadline:
            raise LaneFailed(f"worker {worker_id}: step lane timed out")
        if now > spin_until:
            time.sleep(50e-6)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _SubStep:
    """One micro-batch's pass through the MoE layers of a step."""

    def __init__(self, slot, mb, t, tb, lanes, owner, fallback_groups, reply_dtype) -> None:
        self.slot, self.mb, self.t, self.tb = slot, mb, t, tb
        # index j = owner value j; None = dead this step. Shared by the micro-batches of one step
        # (same lanes): a lane failing in one is gone for the other too.
        self.lanes: list[ReplicaLane | None] = lanes
        self.owner = owner  # [G] or [G, Tb] int lane index per (group[, row]), -1 = per-call fallback
        self.fallback_groups = fallback_groups
        self.reply_dtype = reply_dtype
        self.next_layer = -1
        self.started = False
        self.group: list[_SubStep] = [self]  # the step's micro-batches on these lanes, in dispatch order
        self.header: list[int] | None = None
        self.bufs: dict[int, tuple] = {}
        self.works: dict[int, tuple] = {}


class _PendingStep:
    def __init__(self, owner: "StepLaneExperts", sub: _SubStep, layer: int, x, ids, weights, own, last: bool) -> None:
        self.o, self.sub, self.layer, self.last = owner, sub, layer, last
        self.x, self.ids, self.weights, self.own = x, ids, weights, own

    def wait(self) -> torch.Tensor:
        return self.o._finish(self)


class _Plan:
    """A captured bucket: what its graph was captured over (lanes, owner map) and what a replay
    needs from the host (the header to write, the load counters to read)."""

    def __init__(self, signature, header_: list[int], lanes, subs, load) -> None:
        self.signature, self.header, self.lanes, self.load = signature, header_, lanes, load
        self.subs = subs  # kept alive: the graph reads their owner maps (allocated outside its pool)
        self.counts = [s.t for s in subs]


class StepLaneExperts:
    """ExpertCompute over step lanes; everything else (placement epochs, metrics, retries,
    adopt) is the wrapped RemoteExperts'."""

    def __init__(self, remote: RemoteExperts, device: torch.device | str = "cpu", slots: int = 2,
                 timeout_s: float = 30.0, replica_id: str | None = None) -> None:
        if getattr(remote, "local", None) is not None:
            # groups held in this process ("local") have no lane; config.py rejects the combination
            raise ValueError("the step lane does not serve replica-local groups (elastic.local_groups)")
        self.remote = remote
        self.cfg = remote.cfg
        self.device = torch.device(device)
        self.slots = max(1, slots)  # lanes per worker for micro-batches nobody announced (begin_step)
        self.timeout_s = timeout_s
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.moe_layers = [layer for layer in range(self.cfg.num_layers) if self.cfg.is_moe_layer(layer)]
        self._next = {a: b for a, b in zip(self.moe_layers, self.moe_layers[1:] + [-1])}
        self._lanes: dict[tuple[str, int], ReplicaLane] = {}
        self._subs: list[_SubStep] = []
        self._announced: list[_SubStep] = []
        self._opened = 0
        self.lane_failures = 0
        self._load: list[tuple[int, torch.Tensor, int]] = []  # (layer, [G] device counts, T) until the boundary
        self._plans: dict = {}  # captured bucket key -> _Plan
        self._capture: dict | None = None  # the bucket being captured
        self._inflight: tuple | None = None  # (deadline, plan) of the replay just launched
        self.graph_replays = 0
        self.graph_stale = 0

    def __getattr__(self, name):
        return getattr(self.remote, name)

    # ---- steps -----------------------------------------------------------------------------------

    def on_step_boundary(self) -> int:
        epoch = self.remote.on_step_boundary()
        self._subs.clear()
        self._announced = []
        self._opened = 0
        self._flush_load()
        live = {w for w in self.remote.placement.workers if w not in self.remote._down}
        for key, lane in list(self._lanes.items()):
            if key[0] not in live or lane.broken is not None or lane.ref is not self.remote._workers.get(key[0]):
                self._drop(key)
        return epoch

    def begin_step(self, counts: list[int]) -> None:
        """Announce the step's micro-batches (token counts in dispatch order; at most two) before
        its first MoE layer. They then share ONE lane per worker: one header carries both, and
        their layers go over it in the order they are dispatched (A0 B0 A1 B1 ... for ping-pong),
        which the worker's loop follows. Two communicators between the same two devices with ops
        in flight on both can deadlock (NCCL launches them in no agreed order); one cannot.
        Idempotent for the same counts before the first dispatch (a graph capture announces
        before the forward, whose runner announces again)."""
        counts = [int(c) for c in counts]
        if not counts or len(counts) > 2:
            raise ValueError(f"step lane: 1 or 2 micro-batches a step, got {counts}")
        pending = [s for s in self._announced if not s.started]
        if pending and len(pending) == len(self._announced) and [s.t for s in pending] == counts:
            return
        self._announced = self._open(counts, slot=0)

    def _lane(self, worker_id: str, slot: int) -> ReplicaLane | None:
        key = (worker_id, slot)
        lane = self._lanes.get(key)
        if lane is None:
            try:
                lane = ReplicaLane(self.remote._workers[worker_id], slot, self.device, self.timeout_s, self.replica_id)
            except Exception as exc:  # noqa: BLE001 - the worker cannot open a lane: per-call path
                log.warning("step lane to %s failed to open: %s", worker_id, exc)
                self.remote._mark_down(worker_id)
                return None
            self._lanes[key] = lane
        return lane

    def _drop(self, key) -> None:
        lane = self._lanes.pop(key, None)
        if lane is not None:
            lane.close()

    def _route(self, slot: int):
        """Host-only: live lanes (opening them), per-group owner lane, fallback groups."""
        placement, down = self.remote.placement, self.remote._down
        lanes: list[ReplicaLane | None] = []
        index: dict[str, int] = {}
        for w in placement.workers:
            if w in down:
                continue
            lane = self._lane(w, slot)
            if lane is not None:
                index[w] = len(lanes)
                lanes.append(lane)
        owner_g = [-1] * self.cfg.n_groups
        fallback, holders_of, split = [], {}, False
        for g in range(self.cfg.n_groups):
            live = [h for h in placement.holders_of(g) if h in index]
            holders_of[g] = live
            if not live:
                fallback.append(g)
            elif len(live) == 1:
                owner_g[g] = index[live[0]]
            else:
                split = True
        return lanes, index, owner_g, fallback, holders_of, split

    def _open(self, counts: list[int], slot: int) -> list[_SubStep]:
        lanes, index, owner_g, fallback, holders_of, split = self._route(slot)
        g_count = self.cfg.n_groups
        whole = len(lanes) == 1 and not fallback and not split
        reply_dtype = None if whole else torch.float32  # None: the model dtype, filled at the first layer
        shared = None if split else _to_device(torch.tensor(owner_g, dtype=torch.int64), self.device)
        subs = []
        for mb, t in enumerate(counts):
            tb = bucket(t)
            owner = shared
            if split:
                from actors.experts.placement import split_rows

                owner = torch.full((g_count, tb), -1, dtype=torch.int64)
                for g in range(g_count):
                    live = holders_of[g]
                    if len(live) == 1:
                        owner[g] = index[live[0]]
                    elif live:
                        for h, (a, b) in zip(live, split_rows(t, len(live))):
                            owner[g, a:b] = index[h]
                owner = _to_device(owner, self.device)
            subs.append(_SubStep(slot, mb, t, tb, lanes, owner, fallback, reply_dtype))
        for sub in subs:
            sub.group = subs
        self._subs.extend(subs)
        self._opened += 1
        return subs

    def _start(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> _SubStep:
        """The sub-step a first-MoE-layer dispatch begins; the step's header goes out with the
        first micro-batch (captured into the graph when capturing: the buffer is filled before
        each replay, see graph_begin)."""
        sub = next((s for s in self._announced if not s.started), None)
        if sub is None:  # not announced: a single micro-batch, on its own slot if another is open
            open_now = len({s.slot for s in self._subs if s.next_layer != -1})
            sub = self._open([x.shape[0]], slot=min(open_now, self.slots - 1))[0]
        elif sub.t != x.shape[0]:
            raise RuntimeError(f"step lane: micro-batch of {x.shape[0]} tokens, {sub.t} announced")
        sub.started = True
        if all(s.started for s in self._announced):
            self._announced = []
        if sub.mb > 0:
            return sub
        reply_dtype = sub.reply_dtype or x.dtype
        for s in sub.group:
            s.reply_dtype = reply_dtype
        second = sub.group[1] if len(sub.group) > 1 else None
        h = header(OP_STEP, self.remote.epoch, len(self.moe_layers), sub.tb, sub.t, x.dtype, reply_dtype,
                   x.shape[1], topk_ids.shape[1], second.tb if second else 0, second.t if second else 0)
        sub.header = h
        capturing = _capturing(self.device)
        for j, lane in enumerate(sub.lanes):
            if lane is None:
                continue
            try:
                if not capturing:
                    lane.write_header(h)
                lane.post_header(capturing)
            except Exception as exc:  # noqa: BLE001 - the worker died between steps
                self._lane_failed(sub, j, exc)
        return sub

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        if layer == self.moe_layers[0]:
            sub = self._start(layer, x, topk_ids)
        else:
            sub = next((s for s in self._subs if s.next_layer == layer), None)
            if sub is None:
                raise RuntimeError(f"step lane: layer {layer} dispatched outside a step")
        sub.next_layer = self._next[layer]
        self._record_load(layer, topk_ids)
        single = len(sub.lanes) == 1 and not sub.fallback_groups
        own = None if single else self._owners_of(sub, topk_ids)  # one lane: every slot is its
        for j, lane in enumerate(sub.lanes):
            if lane is None:
                continue
            bufs = sub.bufs.get(j)
            if bufs is None:
                bufs = sub.bufs[j] = lane.buffers(sub.tb, x.shape[1], topk_ids.shape[1], x.dtype, sub.reply_dtype,
                                                  sub.mb)
                bufs[0].clear_tail(sub.t)
            ids_j = topk_ids if single else torch.where(own == j, topk_ids, -1)
            try:
                sub.works[j] = lane.send_layer(bufs, x, ids_j, topk_weights)
            except Exception as exc:  # noqa: BLE001
                self._lane_failed(sub, j, exc)
        return _PendingStep(self, sub, layer, x, topk_ids, topk_weights, own, last=sub.next_layer == -1)

    def _owners_of(self, sub: _SubStep, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, K] lane index serving each slot (-1: per-call fallback), on the device."""
        group_of = topk_ids // self.cfg.experts_per_group  # [T, K]
        if sub.owner.dim() == 1:
            return sub.owner[group_of]
        rows = torch.arange(topk_ids.shape[0], device=topk_ids.device).unsqueeze(1).expand_as(group_of)
        return sub.owner[group_of, rows]

    def _finish(self, p: _PendingStep) -> torch.Tensor:
        sub = p.sub
        t = p.x.shape[0]
        # nccl: the last layer of a step polls the device against the deadline (failures never
        # raise on the host); not while capturing (no host sync in a graph: graph_end polls)
        deadline = time.monotonic() + self.timeout_s if p.last and not _capturing(self.device) else None
        parts: list[torch.Tensor] = []
        for j, lane in enumerate(sub.lanes):
            if lane is None:
                continue
            try:
                parts.append(lane.finish_layer(sub.bufs[j], sub.works.pop(j), deadline)[:t])
            except LaneFailed as exc:
                self._lane_failed(sub, j, exc)
                raise StepRerun(str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - gloo: the peer is gone; this layer re-runs its groups
                self._lane_failed(sub, j, exc)
        dead = [j for j, lane in enumerate(sub.lanes) if lane is None]
        fallback = self._fallback(p, dead)
        if p.last:
            self._subs.remove(sub)
        if len(parts) == 1 and not fallback:
            return parts[0].to(p.x.dtype, copy=True)
        out = torch.zeros(p.x.shape, dtype=torch.float32, device=p.x.device)
        for part in parts + fallback:
            out += part.float()
        return out.to(p.x.dtype)

    # ---- CUDA graphs (replica side) ---------------------------------------------------------------
    #
    # The model runner captures whole decode steps per batch bucket (actors/engine/graphs/) with
    # each MoE layer's packet send and partial recv inside, and the step's header send first. The
    # host then does per step: graph_begin (check the lanes and owner map are the ones captured,
    # write the header buffer), replay, graph_end (poll an event against the deadline). Both sides
    # post the same ops in the same order as an eager step: header, then per layer (per
    # micro-batch) packet out, partial back; the worker (eager or its own graph) cannot tell.

    @property
    def graph_safe(self) -> bool:
        """Whole steps may be captured: CUDA with nccl lanes (MOGE_REPLICA_GRAPHS=0: never)."""
        return self.device.type == "cuda" and os.environ.get(REPLICA_GRAPHS_ENV, "1") != "0"

    def _signature(self):
        """What a captured step depends on, host-side: the slot-0 lanes (by identity) and the
        group -> lane map. None when the placement cannot be captured (a group split between
        holders, groups with no live lane, gloo)."""
        lanes, _, owner_g, fallback, _, split = self._route(0)
        if split or fallback or not lanes or any(lane.backend != "nccl" for lane in lanes):
            return None
        return tuple(lane.lane_id for lane in lanes), tuple(owner_g)

    def graph_prepare(self, key, counts: list[int]) -> bool:
        """Before capturing bucket `key` (its micro-batches' token counts `counts`), eagerly and
        after an eager warm-up of the same shapes (lanes open, buffers allocated): open the step
        so that nothing in the capture allocates host-fed tensors. False: do not capture."""
        self._subs.clear()
        self._announced = []
        sig = self._signature()
        if sig is None:
            return False
        self.begin_step(counts)
        self._capture = {"key": key, "sig": sig, "subs": list(self._announced), "load": []}
        return True

    def graph_captured(self, key, ok: bool = True) -> None:
        cap, self._capture = self._capture, None
        self._announced = []
        self._subs.clear()
        if ok and cap is not None and cap["key"] == key and cap["subs"][0].header is not None:
            lead = cap["subs"][0]
            self._plans[key] = _Plan(cap["sig"], lead.header, [lane for lane in lead.lanes if lane is not None],
                                     cap["subs"], cap["load"])

    def graph_begin(self, key) -> bool:
        """Before replaying bucket `key`: True when its graph still matches the lanes (then the
        header is written and the caller must replay and call graph_end); False: run eagerly."""
        plan = self._plans.get(key)
        if plan is None:
            return False
        if self._signature() != plan.signature:
            self.graph_stale += 1
            if self.graph_stale == 1 or self.graph_stale % 1000 == 0:
                log.warning("step lane: lanes or placement changed since capture; bucket %s runs eagerly", key)
            return False
        h = list(plan.header)
        h[1] = self.remote.epoch
        for lane in plan.lanes:
            lane.write_header(h)
        if self.cfg.family == "moge":
            for layer in self.moe_layers:
                for t in plan.counts:
                    self.remote.load.record(layer, [t] * self.cfg.n_groups, t)
        self._inflight = (time.monotonic() + self.timeout_s, plan)
        self.graph_replays += 1
        return True

    def graph_end(self) -> None:
        """After the replay: top-k counts copied out, then the device polled up to the deadline.
        A timeout aborts the step's lanes and raises StepRerun: the runner re-runs the step
        eagerly (new lanes; a dead worker then fails to open one and is routed around)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        deadline, plan = inflight
        for layer, counts, t in plan.load:
            self._load.append((layer, counts.clone(), t))
        try:
            _await_device(deadline, ",".join(lane.worker_id for lane in plan.lanes))
        except LaneFailed as exc:
            log.warning("step lane: captured step timed out: %s", exc)
            self.lane_failures += 1
            for lane in plan.lanes:
                lane.broken = exc
                self._lanes.pop((lane.worker_id, lane.slot), None)
                lane.abort()
            raise StepRerun(str(exc)) from exc

    def _record_load(self, layer: int, topk_ids: torch.Tensor) -> None:
        t = topk_ids.shape[0]
        if self._capture is not None and self.cfg.family == "moge":
            return  # graph_begin records a replayed step's load
        if self.cfg.family == "moge":  # every token visits every group: nothing to count
            self.remote.load.record(layer, [t] * self.cfg.n_groups, t)
            return
        from actors.model.routing import tokens_per_group

        counts = tokens_per_group(topk_ids, self.cfg)
        if self._capture is not None:  # a captured step's counters: copied after each replay
            self._capture["load"].append((layer, counts, t))
        else:
            self._load.append((layer, counts, t))  # read at the boundary

    def _flush_load(self) -> None:
        """Top-k group counts stay on the device during the step; one copy per step reads them."""
        if not self._load:
            return
        counts = torch.stack([c for _, c, _ in self._load]).tolist()
        for (layer, _, t), row in zip(self._load, counts):
            self.remote.load.record(layer, row, t)
        self._load.clear()

    def metrics(self, reset: bool = False) -> dict:
        self._flush_load()
        return {**self.remote.metrics(reset), "lane_failures": self.lane_failures}

    def _fallback(self, p: _PendingStep, dead: list[int]) -> list[torch.Tensor]:
        """Slots no live lane serves (groups without a live holder at step start, lanes that
        failed this step): RemoteExperts' per-call retry path, group by group."""
        sub = p.sub
        if not dead and not sub.fallback_groups:
            return []
        own = p.own if p.own is not None else self._owners_of(sub, p.ids)
        mask = own == -1
        for j in dead:
            mask |= own == j
        ids = torch.where(mask, p.ids, -1)
        groups = sorted(set((ids[ids >= 0] // self.cfg.experts_per_group).tolist()))  # slow path: a sync is fine
        call = _Call("", groups, None, p.x, ids, p.weights, None)  # "": _alternative starts from the placement
        error = LaneFailed("step lane unavailable")
        return [self.remote._retry(p.layer, call, g, error)[2] for g in groups]

    def _lane_failed(self, sub: _SubStep, j: int, exc: Exception) -> None:
        lane = sub.lanes[j]
        if lane is None:
            return
        log.warning("step lane to %s failed: %s", lane.worker_id, exc)
        self.lane_failures += 1
        lane.broken = exc
        sub.lanes[j] = None
        self.remote._mark_down(lane.worker_id)
        self._lanes.pop((lane.worker_id, lane.slot), None)
        lane.abort()

    def close(self) -> None:
        self._plans.clear()
        for key in list(self._lanes):
            self._drop(key)
        self.remote.close()

