"""The step lane, replica side: a StepCarrier that talks to each expert worker once per step over a
dedicated 2-rank communicator (replica_lane.py), and per MoE layer moves only device tensors.

    step start   header (int64 [16]) to every lane: buckets, layers, epoch, the lane's groups
    each layer   one packet out per lane (x + routing ids + weights, wire.py), the lane's
                 per-group partials back ([n, Tb, D], or their sum when it serves every group)

No control channel, no host copy, no Python request per layer: on nccl every per-layer operation
is asynchronous on the device, so the CPU runs ahead and the same calls can be captured in a CUDA
graph (shapes are fixed per bucket; the header is a device buffer filled before the step).

Micro-batches (ping-pong) share ONE lane per worker: one header carries both sizes, and their
layers go over it in the order dispatched, A0 B0 A1 B1 ..., which the worker's loop follows. NCCL
matches point-to-point operations by order only (tags are ignored), and two communicators between
the same devices with operations in flight on both can deadlock (seen on 2x H200), so order on one
communicator is the whole protocol.

Failures: on gloo a dead or stopped peer raises at the layer's wait (bounded by the call deadline
the dispatcher fixed at send); on nccl failures are asynchronous, so the last layer of every
micro-batch polls a device event against that deadline, and a timeout is a device-side LinkFailed
(the step's results cannot be trusted: the dispatcher raises StepRerun). Which groups go where, and
what happens after a failure, is the dispatcher's.

Shape legend: T = tokens, Tb = bucket, D = hidden, K = slots per token, n = a lane's groups.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import torch

from actors.experts.carriers.base import LinkFailed, StepCarrier, StepHeader, WorkerRef
from actors.experts.lane.replica_lane import DeviceTimeout, ReplicaLane, await_device
from actors.experts.lane.wire import OP_STEP, bucket, header

log = logging.getLogger(__name__)

REPLICA_GRAPHS_ENV = "MOGE_REPLICA_GRAPHS"  # "0": the replica never captures steps over lanes


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class LaneCarrier(StepCarrier):
    name = "lane"

    def __init__(self, device: torch.device | str = "cpu", timeout_s: float = 30.0, replica_id: str | None = None) -> None:
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.graph_safe = self.device.type == "cuda" and os.environ.get(REPLICA_GRAPHS_ENV, "1") != "0"
        self._lanes: dict[str, ReplicaLane] = {}
        self._headers: dict[str, StepHeader] = {}  # the step in flight, per lane
        self._works: dict[tuple[int, int], dict[str, tuple]] = {}
        self._cleared: set[tuple[str, int]] = set()
        self.report_latency = lambda worker_id, seconds: None

    # ---- links -------------------------------------------------------------------------------

    def sync(self, workers: dict[str, WorkerRef]) -> set[str]:
        for w, lane in list(self._lanes.items()):
            if w not in workers or lane.broken is not None or lane.ref is not workers[w]:
                self._drop(w, close=True)
        for w, ref in workers.items():
            if w not in self._lanes:
                try:
                    self._lanes[w] = ReplicaLane(ref, self.device, self.timeout_s, self.replica_id)
                except Exception as exc:  # noqa: BLE001 - the worker cannot open a lane: per call
                    log.warning("step lane to %s failed to open: %s", w, exc)
        self._works.clear()
        return set(self._lanes)

    def backends(self) -> set[str]:
        return {lane.backend for lane in self._lanes.values()}

    def signature(self) -> tuple:
        """What a captured step depends on here: the lanes, by identity (all nccl), or None."""
        if any(lane.backend != "nccl" for lane in self._lanes.values()):
            return None
        return tuple(sorted(lane.lane_id for lane in self._lanes.values()))

    def _drop(self, w: str, close: bool = False, error: Exception | None = None) -> None:
        lane = self._lanes.pop(w, None)
        if lane is None:
            return
        if close:
            lane.close()
        else:
            lane.broken = error or RuntimeError("failed")
            lane.abort()

    # ---- a step --------------------------------------------------------------------------------

    def rows(self, t: int) -> int:
        return bucket(t)

    def start(self, headers: dict[str, StepHeader]) -> set[str]:
        cap = capturing(self.device)
        failed = set()
        self._headers = dict(headers)
        self._cleared.clear()
        for w, h in headers.items():
            lane = self._lanes.get(w)
            try:
                if lane is None:
                    raise LinkFailed(w, "no lane")
                if not cap:  # a captured header is written before each replay (write_headers)
                    lane.write_header(header(OP_STEP, h))
                lane.post_header(cap)
            except Exception as exc:  # noqa: BLE001 - the worker died between steps
                log.warning("step lane to %s failed: %s", w, exc)
                failed.add(w)
                self._drop(w, error=exc)
        return failed

    def write_headers(self, headers: dict[str, StepHeader]) -> None:
        """Before a replay: the captured header buffers get this step's contents."""
        for w, h in headers.items():
            self._lanes[w].write_header(header(OP_STEP, h))

    def send(self, mb, layer, x, ids, weights) -> set[str]:
        t, d = x.shape
        failed, works = set(), {}
        for w, ids_w in ids.items():
            lane, h = self._lanes.get(w), self._headers.get(w)
            try:
                if lane is None or h is None:
                    raise LinkFailed(w, "no lane in this step")
                tb = h.rows[mb]
                reply = (tb, d) if h.whole else (len(h.groups), tb, d)
                bufs = lane.buffers(tb, d, ids_w.shape[1], x.dtype, reply, mb)
                if (w, mb) not in self._cleared:  # rows t.. of the bucket carry no slots this step
                    bufs[0].clear_tail(t)
                    self._cleared.add((w, mb))
                works[w] = (bufs, lane.send_layer(bufs, x, ids_w, weights), time.monotonic())
            except Exception as exc:  # noqa: BLE001
                log.warning("step lane to %s failed: %s", w, exc)
                failed.add(w)
                self._drop(w, error=exc)
        self._works[(mb, layer)] = works
        return failed

    def receive(self, mb, layer, deadline, last) -> dict[str, torch.Tensor | LinkFailed]:
        # nccl: the last layer of a micro-batch polls the device against the deadline (failures never
        # raise on the host); not while capturing (no host sync in a graph: settle polls instead)
        poll = last and not capturing(self.device)
        out: dict[str, torch.Tensor | LinkFailed] = {}
        for w, (bufs, works, sent_at) in self._works.pop((mb, layer), {}).items():
            lane = self._lanes.get(w)
            if lane is None:
                out[w] = LinkFailed(w, "lane closed")
                continue
            waited = time.monotonic()
            try:
                reply = lane.finish_layer(bufs, works, deadline if poll or lane.backend == "gloo" else None)
                if lane.backend == "gloo":
                    self.report_latency(w, time.monotonic() - waited)  # what the step thread was held up
                out[w] = reply
            except DeviceTimeout as exc:
                out[w] = LinkFailed(w, str(exc), device_side=True)
                self._drop(w, error=exc)
            except Exception as exc:  # noqa: BLE001 - gloo: the peer is gone or past the deadline
                out[w] = LinkFailed(w, str(exc))
                self._drop(w, error=exc)
        return out

    def settle(self, deadline: float) -> None:
        """After a replay: the device polled up to the deadline; a timeout aborts every lane of
        the step and raises a device-side LinkFailed (the caller re-runs the step eagerly)."""
        try:
            await_device(deadline, ",".join(self._lanes))
        except DeviceTimeout as exc:
            log.warning("step lane: captured step timed out: %s", exc)
            for w in list(self._lanes):
                self._drop(w, error=exc)
            raise LinkFailed(",".join(sorted(self._headers)), str(exc), device_side=True) from exc

    def close(self) -> None:
        for w in list(self._lanes):
            self._drop(w, close=True)
