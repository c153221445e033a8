"""The gRPC carrier per call, replica side: one channel per worker, one unary ExpertData.Compute per
call (every call with a deadline and the cluster secret). The path of the per-call data plane and
of every failover; the per-step stream is grpc_stream.py. Options: grpc_wire.py.

Also the two control calls a process without a Ray handle makes: fetch_groups (a peer's weights,
streamed) and worker_stats.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future

import grpc
import torch

from actors.experts.carriers.base import Carrier, TransportError, WorkerRef
from actors.experts.carriers.grpc_wire import (
    DEFAULT_MAX_MESSAGE, auth_metadata, channel, tensor_from_proto, tensor_to_proto,
)
from protos import moge_expert_pb2 as pb
from protos import moge_expert_pb2_grpc as pb_grpc


class GrpcCarrier(Carrier):
    name = "grpc"

    def __init__(
        self,
        timeout_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
        auth_token: str | None = None,
        **_: object,
    ) -> None:
        self.timeout_s = timeout_s
        self.metadata = auth_metadata(auth_token)
        self.max_message_bytes = max_message_bytes
        self.tls = dict(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name)
        self._lock = threading.Lock()
        self._links: dict[str, tuple[dict, grpc.Channel, pb_grpc.ExpertDataStub]] = {}

    def open_channel(self, endpoint: dict) -> grpc.Channel:
        return channel(endpoint, self.max_message_bytes, **self.tls)

    def connect(self, worker: WorkerRef) -> None:
        endpoint = worker.endpoint or worker.invoke("endpoint")
        with self._lock:
            old = self._links.get(worker.worker_id)
            if old is not None and old[0] == endpoint:
                return
            ch = self.open_channel(endpoint)
            self._links[worker.worker_id] = (endpoint, ch, pb_grpc.ExpertDataStub(ch))
        if old is not None:
            old[1].close()

    def disconnect(self, worker_id: str) -> None:
        with self._lock:
            link = self._links.pop(worker_id, None)
        if link is not None:
            link[1].close()

    def connected(self) -> list[str]:
        return list(self._links)

    def call(self, worker_id, layer, group_ids, x, ids, weights) -> "Future[torch.Tensor]":
        out: Future = Future()
        link = self._links.get(worker_id)
        if link is None:
            out.set_exception(TransportError(f"worker {worker_id} is not connected"))
            return out
        request = pb.ComputeRequest(
            layer=layer,
            group_ids=list(group_ids),
            x=tensor_to_proto(x),
            ids=tensor_to_proto(ids),
            weights=tensor_to_proto(weights),
        )
        device = x.device
        rpc = link[2].Compute.future(request, timeout=self.timeout_s, metadata=self.metadata)

        def done(f: grpc.Future) -> None:
            try:
                out.set_result(tensor_from_proto(f.result().y, device))
            except grpc.RpcError as exc:
                out.set_exception(TransportError(f"worker {worker_id}: {exc.code().name}: {exc.details()}"))
            except Exception as exc:  # noqa: BLE001 - any decode failure must reach the waiter
                out.set_exception(exc)

        rpc.add_done_callback(done)
        return out


def fetch_groups(endpoint: dict, groups: list[int], timeout_s: float = 600.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                 auth_token: str | None = None, **tls) -> dict[int, dict]:
    """Stream `groups` from a holder's WorkerControl.ExportGroups -> the export_groups() layout."""
    ch = channel(endpoint, max_message_bytes, **tls)
    try:
        stub = pb_grpc.WorkerControlStub(ch)
        out: dict[int, dict] = {}
        request = pb.ExportRequest(groups=list(groups))
        for item in stub.ExportGroups(request, timeout=timeout_s, metadata=auth_metadata(auth_token)):
            entry = out.setdefault(item.group, {"group": item.group, "first_expert": item.first_expert, "w13": {}, "w2": {}})
            entry[item.name][item.layer] = tensor_from_proto(item.tensor)
        return out
    finally:
        ch.close()


def worker_stats(endpoint: dict, timeout_s: float = 5.0, auth_token: str | None = None, **tls) -> dict:
    """WorkerControl.Stats over gRPC (for callers without a Ray handle)."""
    ch = channel(endpoint, DEFAULT_MAX_MESSAGE, **tls)
    try:
        stub = pb_grpc.WorkerControlStub(ch)
        return json.loads(stub.Stats(pb.StatsRequest(), timeout=timeout_s, metadata=auth_metadata(auth_token)).json)
    finally:
        ch.close()
