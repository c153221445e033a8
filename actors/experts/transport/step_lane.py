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

Micro-batches (ping-pong): each (worker, slot) pair has its own lane, so the two micro-batches'
layers interleave freely; a dispatch at the first MoE layer opens a sub-step on the next slot,
later layers continue the oldest open sub-step waiting for that layer (the order PingPongRunner
and MoGEModel.forward both follow).

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
import time
import uuid

import torch
import torch.distributed as dist

from actors.experts.remote_experts import RemoteExperts, _Call
from actors.experts.transport.collective import _make_group
from actors.experts.transport.rendezvous_auth import prove
from actors.experts.transport.step_wire import (
    HEADER_LEN, OP_CLOSE, OP_HELLO, OP_STEP, bucket, header, new_packet,
)
from actors.model.expert_compute import StepRerun

log = logging.getLogger(__name__)


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
        self.hdr = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire)
        self.broken: Exception | None = None
        self._bufs: dict[tuple, tuple] = {}
        self._send = self._recv = self._hdr_work = None
        self.send_header(header(OP_HELLO))  # creates the communicator now, not in the first step

    def send_header(self, h: list[int]):
        if self._hdr_work is not None and self.backend != "gloo":
            # nccl sends read `hdr` on the communicator's stream: the overwrite below (on the
            # current stream) must not run before the previous header left (e.g. HELLO then STEP)
            self._hdr_work.wait()
        self.hdr.copy_(_to_device(torch.tensor(h, dtype=torch.int64), self.wire))
        work = self._hdr_work = self.pg.send([self.hdr], 1, 0)
        if self.backend == "gloo":
            work.wait(_td(self.timeout_s))
        return work

    def buffers(self, tb: int, d: int, k: int, dtype: torch.dtype, reply_dtype: torch.dtype):
        key = (tb, d, k, dtype, reply_dtype)
        if key not in self._bufs:
            reply = torch.empty(tb, d, dtype=reply_dtype, device=self.wire)
            self._bufs[key] = (new_packet(tb, d, k, dtype, self.wire), reply)
        return self._bufs[key]

    def send_layer(self, bufs, x, ids, weights) -> None:
        packet, reply = bufs
        packet.fill(x, ids, weights)
        self._send = self.pg.send([packet.buf], 1, 1)
        self._recv = self.pg.recv([reply], 1, 2)

    def finish_layer(self, bufs, deadline: float | None) -> torch.Tensor:
        """The layer's partial [Tb, D] (lane buffer: consume before the next layer)."""
        if self.backend == "gloo":
            self._send.wait(_td(self.timeout_s))
            self._recv.wait(_td(self.timeout_s))
        else:
            self._recv.wait()  # the current stream waits on the device; the host does not
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
            for method in ("abort", "shutdown"):
                fn = getattr(pg, method, None)
                if fn is not None:
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - tearing down a broken communicator
                        pass
                    break


def _await_device(deadline: float, worker_id: str) -> None:
    """Poll the current stream up to `deadline` (nccl failures never raise on the host)."""
    ev = torch.cuda.Event()
    ev.record()
    while not ev.query():
        if time.monotonic() > deadline:
            raise LaneFailed(f"worker {worker_id}: step lane timed out")
        time.sleep(20e-6)


class _SubStep:
    """One micro-batch's pass through the MoE layers of a step."""

    def __init__(self, slot, t, tb, lanes, owner, fallback_groups, reply_dtype) -> None:
        self.slot, self.t, self.tb = slot, t, tb
        self.lanes: list[ReplicaLane | None] = lanes  # index j = owner value j; None = dead this step
        self.owner = owner  # [G] or [G, Tb] int lane index per (group[, row]), -1 = per-call fallback
        self.fallback_groups = fallback_groups
        self.reply_dtype = reply_dtype
        self.next_layer = -1
        self.bufs: dict[int, tuple] = {}


class _PendingStep:
    def __init__(self, owner: "StepLaneExperts", sub: _SubStep, layer: int, x, ids, weights, own, last: bool) -> None:
        self.o, self.sub, self.layer, self.last = owner, sub, layer, last
        self.x, self.ids, self.weights, self.own = x, ids, weights, own

    def wait(self) -> torch.Tensor:
        return self.o._finish(self)


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
        self.slots = slots
        self.timeout_s = timeout_s
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.moe_layers = [layer for layer in range(self.cfg.num_layers) if self.cfg.is_moe_layer(layer)]
        self._next = {a: b for a, b in zip(self.moe_layers, self.moe_layers[1:] + [-1])}
        self._lanes: dict[tuple[str, int], ReplicaLane] = {}
        self._subs: list[_SubStep] = []
        self._opened = 0
        self.lane_failures = 0
        self._load: list[tuple[int, torch.Tensor, int]] = []  # (layer, [G] device counts, T) until the boundary

    def __getattr__(self, name):
        return getattr(self.remote, name)

    # ---- steps -----------------------------------------------------------------------------------

    def on_step_boundary(self) -> int:
        epoch = self.remote.on_step_boundary()
        self._subs.clear()
        self._opened = 0
        self._flush_load()
        live = {w for w in self.remote.placement.workers if w not in self.remote._down}
        for key, lane in list(self._lanes.items()):
            if key[0] not in live or lane.broken is not None or lane.ref is not self.remote._workers.get(key[0]):
                self._drop(key)
        return epoch

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

    def _open(self, t: int) -> _SubStep:
        slot = self._opened % self.slots
        self._opened += 1
        placement, down = self.remote.placement, self.remote._down
        tb = bucket(t)
        lanes: list[ReplicaLane | None] = []
        index: dict[str, int] = {}
        for w in placement.workers:
            if w in down:
                continue
            lane = self._lane(w, slot)
            if lane is not None:
                index[w] = len(lanes)
                lanes.append(lane)
        g_count = self.cfg.n_groups
        split = False
        owner_g = [-1] * g_count
        fallback = []
        holders_of = {}
        for g in range(g_count):
            live = [h for h in placement.holders_of(g) if h in index]
            holders_of[g] = live
            if not live:
                fallback.append(g)
            elif len(live) == 1:
                owner_g[g] = index[live[0]]
            else:
                split = True
        if split:
            owner = torch.full((g_count, tb), -1, dtype=torch.int64)
            for g in range(g_count):
                live = holders_of[g]
                if len(live) == 1:
                    owner[g] = index[live[0]]
                elif live:
                    from actors.experts.placement import split_rows

                    for h, (a, b) in zip(live, split_rows(t, len(live))):
                        owner[g, a:b] = index[h]
            owner = _to_device(owner, self.device)
        else:
            owner = _to_device(torch.tensor(owner_g, dtype=torch.int64), self.device)
        whole = len(lanes) == 1 and not fallback and not split
        reply_dtype = None if whole else torch.float32  # None: the model dtype, filled at the first layer
        sub = _SubStep(slot, t, tb, lanes, owner, fallback, reply_dtype)
        self._subs.append(sub)
        return sub

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        if layer == self.moe_layers[0]:
            sub = self._open(x.shape[0])
            sub.reply_dtype = sub.reply_dtype or x.dtype
            h = header(OP_STEP, self.remote.epoch, len(self.moe_layers), sub.tb, sub.t, x.dtype,
                       sub.reply_dtype, x.shape[1], topk_ids.shape[1])
            for j, lane in enumerate(sub.lanes):
                try:
                    lane.send_header(h)
                except Exception as exc:  # noqa: BLE001 - the worker died between steps
                    self._lane_failed(sub, j, exc)
        else:
            sub = next((s for s in self._subs if s.next_layer == layer), None)
            if sub is None:
                raise RuntimeError(f"step lane: layer {layer} dispatched outside a step")
        sub.next_layer = self._next[layer]
        self._record_load(layer, topk_ids)
        group_of = topk_ids // self.cfg.experts_per_group  # [T, K]
        if sub.owner.dim() == 1:
            own = sub.owner[group_of]
        else:
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(group_of)
            own = sub.owner[group_of, rows]
        for j, lane in enumerate(sub.lanes):
            if lane is None:
                continue
            bufs = sub.bufs.get(j)
            if bufs is None:
                bufs = sub.bufs[j] = lane.buffers(sub.tb, x.shape[1], topk_ids.shape[1], x.dtype, sub.reply_dtype)
                bufs[0].clear_tail(sub.t)
            ids_j = topk_ids if len(sub.lanes) == 1 and not sub.fallback_groups else torch.where(own == j, topk_ids, -1)
            try:
                lane.send_layer(bufs, x, ids_j, topk_weights)
            except Exception as exc:  # noqa: BLE001
                self._lane_failed(sub, j, exc)
        return _PendingStep(self, sub, layer, x, topk_ids, topk_weights, own, last=sub.next_layer == -1)

    def _finish(self, p: _PendingStep) -> torch.Tensor:
        sub = p.sub
        t = p.x.shape[0]
        deadline = time.monotonic() + self.timeout_s if p.last else None
        parts: list[torch.Tensor] = []
        for j, lane in enumerate(sub.lanes):
            if lane is None:
                continue
            try:
                parts.append(lane.finish_layer(sub.bufs[j], deadline)[:t])
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

    def _record_load(self, layer: int, topk_ids: torch.Tensor) -> None:
        t = topk_ids.shape[0]
        if self.cfg.family == "moge":  # every token visits every group: nothing to count
            self.remote.load.record(layer, [t] * self.cfg.n_groups, t)
            return
        from actors.model.routing import tokens_per_group

        self._load.append((layer, tokens_per_group(topk_ids, self.cfg), t))  # read at the boundary

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
        mask = p.own == -1
        for j in dead:
            mask |= p.own == j
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
        for key in list(self._lanes):
            self._drop(key)
        self.remote.close()

