"""The gRPC carrier per step, replica side: one bidirectional ExpertData.Steps stream per (replica,
worker), opened at a step boundary and kept open. A step is one StepStart on each stream, then
per MoE layer and micro-batch one LayerInput out and one LayerOutput back, in order — no call set-up,
no metadata, no interceptor, no server thread hand-off per layer: what is left is the wire (the
bytes, serialised once) and the worker's compute. The unary per-call carrier (grpc_call.py) stays
for failover.

Replies are matched to requests by order: a reader thread per stream completes the oldest pending
future with each LayerOutput, and reports the latency it measured at arrival (`report_latency`),
so the dispatcher's deadlines never include the step thread's own delays. A stream that breaks or
misses a deadline is cancelled; its worker's groups fail over and the next boundary reopens it if
the worker is still in the placement and not marked down.

Shape legend: T = tokens of the micro-batch, D = hidden, K = slots per token, n = the stream's groups.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, TimeoutError as FutureTimeout

import torch

from actors.experts.carriers.base import LinkFailed, StepCarrier, StepHeader, WorkerRef
from actors.experts.carriers.grpc_call import GrpcCarrier
from actors.experts.carriers.grpc_wire import tensor_from_proto, tensor_to_proto
from protos import moge_expert_pb2 as pb
from protos import moge_expert_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_END = object()


class _Stream:
    def __init__(self, ref: WorkerRef, carrier: "GrpcStreamCarrier") -> None:
        self.worker_id = ref.worker_id
        self.endpoint = ref.endpoint or ref.invoke("endpoint")
        self.carrier = carrier
        self.channel = carrier.per_call.open_channel(self.endpoint)
        self.broken: Exception | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque[tuple[Future, float]] = deque()
        stub = pb_grpc.ExpertDataStub(self.channel)
        self._call = stub.Steps(iter(self._requests.get, _END), metadata=carrier.per_call.metadata)
        self._reader = threading.Thread(target=self._read, name=f"moge-steps-{self.worker_id}", daemon=True)
        self._reader.start()

    def post(self, message: pb.StepMessage, reply: bool) -> Future | None:
        if self.broken is not None:
            raise LinkFailed(self.worker_id, f"stream broken: {self.broken}")
        fut = None
        if reply:
            fut = Future()
            self._pending.append((fut, time.monotonic()))  # before the request: the reader pops in order
        self._requests.put(message)
        return fut

    def _read(self) -> None:
        try:
            for out in self._call:
                fut, sent_at = self._pending.popleft()
                self.carrier.report_latency(self.worker_id, time.monotonic() - sent_at)
                fut.set_result(out)
            self.broken = self.broken or RuntimeError("the worker ended the stream")
        except Exception as exc:  # noqa: BLE001 - cancelled, worker gone, deadline: the stream is over
            self.broken = self.broken or exc
        while self._pending:
            fut, _ = self._pending.popleft()
            fut.set_exception(LinkFailed(self.worker_id, f"stream broken: {self.broken}"))

    def close(self) -> None:
        self.broken = self.broken or RuntimeError("closed")
        self._requests.put(_END)
        self._call.cancel()
        self.channel.close()


class GrpcStreamCarrier(StepCarrier):
    name = "grpc-stream"

    def __init__(self, per_call: GrpcCarrier, device: torch.device | str = "cpu") -> None:
        self.per_call = per_call  # its channel options and secret; it keeps carrying failover calls
        self.device = torch.device(device)
        self._streams: dict[str, _Stream] = {}
        self._sent: dict[tuple[int, int], dict[str, Future]] = {}
        self.report_latency = lambda worker_id, seconds: None  # the dispatcher's, if it wants them

    def sync(self, workers: dict[str, WorkerRef]) -> set[str]:
        for w in [w for w, s in self._streams.items() if w not in workers or s.broken is not None]:
            self._streams.pop(w).close()
        for w, ref in workers.items():
            stream = self._streams.get(w)
            if stream is not None and stream.endpoint != (ref.endpoint or stream.endpoint):
                self._streams.pop(w).close()  # replaced under the same id: a new address
                stream = None
            if stream is None:
                try:
                    self._streams[w] = _Stream(ref, self)
                except Exception as exc:  # noqa: BLE001 - no stream: this worker goes per call
                    log.warning("step stream to %s failed to open: %s", w, exc)
        self._sent.clear()
        return set(self._streams)

    def rows(self, t: int) -> int:
        return t

    def start(self, headers: dict[str, StepHeader]) -> set[str]:
        failed = set()
        for w, h in headers.items():
            msg = pb.StepMessage(start=pb.StepStart(epoch=h.epoch, n_layers=h.n_layers, counts=list(h.counts),
                                                    groups=list(h.groups), whole=h.whole))
            if not self._post(w, msg, reply=False, failed=failed):
                continue
        return failed

    def send(self, mb, layer, x, ids, weights) -> set[str]:
        xp, wp = tensor_to_proto(x), tensor_to_proto(weights)  # serialised once for every stream
        sent, failed = {}, set()
        for w, ids_w in ids.items():
            msg = pb.StepMessage(layer=pb.LayerInput(layer=layer, micro_batch=mb, x=xp, ids=tensor_to_proto(ids_w),
                                                     weights=wp))
            fut = self._post(w, msg, reply=True, failed=failed)
            if fut is not None:
                sent[w] = fut
        self._sent[(mb, layer)] = sent
        return failed

    def _post(self, w: str, msg, reply: bool, failed: set):
        stream = self._streams.get(w)
        try:
            if stream is None:
                raise LinkFailed(w, "no stream")
            return stream.post(msg, reply) or True
        except LinkFailed:
            failed.add(w)
            self._drop(w)
            return None

    def receive(self, mb, layer, deadline, last) -> dict[str, torch.Tensor | LinkFailed]:
        out: dict[str, torch.Tensor | LinkFailed] = {}
        for w, fut in self._sent.pop((mb, layer), {}).items():
            try:
                reply = fut.result(timeout=max(0.0, deadline - time.monotonic()))
                if reply.error:
                    raise LinkFailed(w, reply.error)
                out[w] = tensor_from_proto(reply.y, self.device)
            except FutureTimeout:
                out[w] = LinkFailed(w, "no reply within the call deadline")
                self._drop(w)
            except LinkFailed as exc:
                out[w] = exc
                self._drop(w)
        return out

    def _drop(self, w: str) -> None:
        stream = self._streams.pop(w, None)
        if stream is not None:
            stream.close()

    def close(self) -> None:
        for w in list(self._streams):
            self._drop(w)
