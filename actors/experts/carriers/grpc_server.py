"""The gRPC carrier, worker side: the server an ExpertWorker starts in its own process on a port
the OS picks, bound to the advertised host. ExpertData.Compute (one call), ExpertData.Steps (the
per-step stream) and WorkerControl (ping, stats, peer export), every call through the Gate
(grpc_wire.py: the cluster secret and a per-peer in-flight limit, before any body is read).

The server holds the worker only through its public surface: compute, held_groups, stats,
export_groups, worker_id, device.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc

from actors.experts.carriers.base import GroupNotHeld
from actors.experts.carriers.grpc_wire import (
    DEFAULT_INFLIGHT_PER_PEER, DEFAULT_MAX_MESSAGE, DEFAULT_THREADS, Gate, hostport, message_options, read_file,
    tensor_from_proto, tensor_to_proto,
)
from protos import moge_expert_pb2 as pb
from protos import moge_expert_pb2_grpc as pb_grpc


class _DataServicer(pb_grpc.ExpertDataServicer):
    def __init__(self, worker) -> None:
        self.worker = worker

    def Compute(self, request: pb.ComputeRequest, context: grpc.ServicerContext) -> pb.ComputeReply:
        try:
            y = self._compute(request.layer, list(request.group_ids), request, whole=False)
        except GroupNotHeld as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:  # malformed tensors, out-of-bounds call: the caller's fault
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ComputeReply(y=tensor_to_proto(y), worker_id=self.worker.worker_id)

    def Steps(self, requests, context: grpc.ServicerContext):
        """One LayerOutput per LayerInput, in order; the last StepStart says which groups (and
        whether their sum) every following layer answers for."""
        start: pb.StepStart | None = None
        for message in requests:
            if message.HasField("start"):
                start = message.start
                continue
            layer = message.layer
            out = pb.LayerOutput(layer=layer.layer, micro_batch=layer.micro_batch)
            try:
                if start is None:
                    raise ValueError("a layer before the step's start")
                out.y.CopyFrom(tensor_to_proto(self._compute(layer.layer, list(start.groups), layer, start.whole)))
            except (GroupNotHeld, ValueError) as exc:  # the replica fails over for this layer
                out.error = f"{type(exc).__name__}: {exc}"
            yield out

    def _compute(self, layer: int, groups: list[int], msg, whole: bool):
        device = self.worker.device
        x = tensor_from_proto(msg.x, device)
        ids = tensor_from_proto(msg.ids, device)
        weights = tensor_from_proto(msg.weights, device)
        y = self.worker.compute(layer, groups, x, ids, weights, whole=whole)
        return y


class _ControlServicer(pb_grpc.WorkerControlServicer):
    def __init__(self, worker) -> None:
        self.worker = worker

    def Ping(self, request, context) -> pb.PingReply:
        return pb.PingReply(worker_id=self.worker.worker_id, held_groups=self.worker.held_groups())

    def Stats(self, request, context) -> pb.StatsReply:
        return pb.StatsReply(json=json.dumps(self.worker.stats()))

    def ExportGroups(self, request: pb.ExportRequest, context):
        try:
            exported = self.worker.export_groups(list(request.groups))
        except GroupNotHeld as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:  # duplicate or too many group ids
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for g, data in exported.items():
            for name in ("w13", "w2"):
                for layer, t in sorted(data[name].items()):
                    yield pb.GroupTensor(
                        group=g, first_expert=data["first_expert"], name=name, layer=layer, tensor=tensor_to_proto(t)
                    )


class GrpcExpertServer:
    def __init__(self, worker, host: str, options: dict) -> None:
        max_bytes = int(options.get("max_message_bytes") or DEFAULT_MAX_MESSAGE)
        token = options.get("auth_token")
        self.gate = Gate(token, int(options.get("max_inflight_per_peer") or DEFAULT_INFLIGHT_PER_PEER))
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=int(options.get("threads") or DEFAULT_THREADS), thread_name_prefix="moge-grpc"),
            options=message_options(max_bytes),
            interceptors=[self.gate],
        )
        self.authenticated = bool(token)
        pb_grpc.add_ExpertDataServicer_to_server(_DataServicer(worker), self._server)
        pb_grpc.add_WorkerControlServicer_to_server(_ControlServicer(worker), self._server)
        cert, key = read_file(options.get("tls_cert")), read_file(options.get("tls_key"))
        target = hostport(host, 0)
        if cert and key:
            ca = read_file(options.get("tls_ca"))
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
            self.port = self._server.add_secure_port(target, creds)
        else:
            self.port = self._server.add_insecure_port(target)
        if not self.port:
            raise RuntimeError(f"gRPC server could not bind {target}")
        self.host, self.tls = host, bool(cert and key)
        self._server.start()

    def address(self) -> dict:
        return {"host": self.host, "port": self.port, "tls": self.tls, "auth": self.authenticated}

    def stop(self) -> None:
        self._server.stop(grace=None)
