"""gRPC transport (protos/moge_expert.proto): tensors as raw bytes with dtype and shape.

Worker side: GrpcExpertServer runs in the ExpertWorker's process on a port the OS picks, bound to
the advertised host, serving ExpertData.Compute and WorkerControl (ping, stats, peer export).
Replica side: GrpcTransport keeps one channel per worker; every call carries a deadline.

Options (transport_options on the worker, keyword arguments of GrpcTransport on the replica):
  max_message_bytes  send/receive limit, both sides (default 256 MiB)
  timeout_s          deadline of one call (replica)
  tls_cert, tls_key  PEM files: server identity (worker); with tls_ca on the worker, clients must
                     present a certificate signed by that CA (mutual TLS)
  tls_ca             PEM file: CA the replica trusts (and the worker checks client certs against)
  tls_server_name    replica: name expected in the worker's certificate, if not its address
  auth_token         the cluster secret (both sides): every RPC must carry it in the
                     `x-moge-auth` metadata, checked by a server interceptor before any handler
                     runs (Compute, Ping, Stats, ExportGroups alike) -> UNAUTHENTICATED otherwise.
                     The cluster creates it at start and hands it out through Ray
                     (cluster/elastic/cluster_secret.py); None leaves the server open (only for
                     in-process tests). TLS / mTLS above stay available on top.
  max_call_tokens    worker: most tokens (rows of x) one Compute may carry (default 65536)
"""

from __future__ import annotations

import hmac
import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from actors.experts.transport.codec import decode, encode
from actors.experts.transport.base import ExpertTransport, GroupNotHeld, TransportError, WorkerRef
from protos import moge_expert_pb2 as pb
from protos import moge_expert_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE = 256 << 20
AUTH_METADATA = "x-moge-auth"


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    enc = encode(t)
    return pb.Tensor(dtype=enc.dtype, shape=list(enc.shape), data=enc.data)


def tensor_from_proto(msg: pb.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return decode(msg.dtype, list(msg.shape), msg.data, device)


def _message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _hostport(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- worker side ------------------------------------------------------------------------------


class _SecretInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC whose `x-moge-auth` metadata is not the cluster secret (constant-time)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(self, continuation, details):
        presented = ""
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA:
                presented = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(presented.encode(), self._token):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        message = "missing or wrong cluster secret"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def deny_stream(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this a generator, as a unary-stream handler must be

        # the request is not even deserialised: the body of an unauthenticated call is never parsed
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((AUTH_METADATA, token),) if token else None


class _DataServicer(pb_grpc.ExpertDataServicer):
    def __init__(self, worker) -> None:
        self.worker = worker

    def Compute(self, request: pb.ComputeRequest, context: grpc.ServicerContext) -> pb.ComputeReply:
        try:
            x = tensor_from_proto(request.x, self.worker.device)
            ids = tensor_from_proto(request.ids, self.worker.device)
            weights = tensor_from_proto(request.weights, self.worker.device)
            y = self.worker.compute(request.layer, list(request.group_ids), x, ids, weights)
        except GroupNotHeld as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:  # malformed tensors, out-of-bounds call: the caller's fault
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ComputeReply(y=tensor_to_proto(y), worker_id=self.worker.worker_id)


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
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=int(options.get("threads", 8)), thread_name_prefix="moge-grpc"),
            options=_message_options(max_bytes),
            interceptors=[_SecretInterceptor(token)] if token else None,
        )
        self.authenticated = bool(token)
        pb_grpc.add_ExpertDataServicer_to_server(_DataServicer(worker), self._server)
        pb_grpc.add_WorkerControlServicer_to_server(_ControlServicer(worker), self._server)
        cert, key = _read(options.get("tls_cert")), _read(options.get("tls_key"))
        target = _hostport(host, 0)
        if cert and key:
            ca = _read(options.get("tls_ca"))
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


# ---- replica side -----------------------------------------------------------------------------


def _channel(endpoint: dict, max_bytes: int, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None):
    target = _hostport(endpoint["host"], endpoint["port"])
    options = _message_options(max_bytes)
    if not endpoint.get("tls"):
        return grpc.insecure_channel(target, options=options)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
    )
    return grpc.secure_channel(target, creds, options=options)


class GrpcTransport(ExpertTransport):
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
        self._metadata = _auth_metadata(auth_token)
        self.max_message_bytes = max_message_bytes
        self._tls = dict(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name)
        self._lock = threading.Lock()
        self._links: dict[str, tuple[dict, grpc.Channel, pb_grpc.ExpertDataStub]] = {}

    def connect(self, worker: WorkerRef) -> None:
        endpoint = worker.endpoint or worker.invoke("endpoint")
        with self._lock:
            old = self._links.get(worker.worker_id)
            if old is not None and old[0] == endpoint:
                return
            channel = _channel(endpoint, self.max_message_bytes, **self._tls)
            self._links[worker.worker_id] = (endpoint, channel, pb_grpc.ExpertDataStub(channel))
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
        rpc = link[2].Compute.future(request, timeout=self.timeout_s, metadata=self._metadata)

        def done(f: grpc.Future) -> None:
            try:
                out.set_result(tensor_from_proto(f.result().y, device))
            except grpc.RpcError as exc:
                out.set_exception(TransportError(f"worker {worker_id}: {exc.code().name}: {exc.details()}"))
            except Exception as exc:  # noqa: BLE001 - any decode failure must reach the waiter
                out.set_exception(exc)

        rpc.add_done_callback(done)
        return out

    def close(self) -> None:
        super().close()


def fetch_groups(endpoint: dict, groups: list[int], timeout_s: float = 600.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                 auth_token: str | None = None, **tls) -> dict[int, dict]:
    """Stream `groups` from a holder's WorkerControl.ExportGroups -> the export_groups() layout."""
    channel = _channel(endpoint, max_message_bytes, **tls)
    try:
        stub = pb_grpc.WorkerControlStub(channel)
        out: dict[int, dict] = {}
        request = pb.ExportRequest(groups=list(groups))
        for item in stub.ExportGroups(request, timeout=timeout_s, metadata=_auth_metadata(auth_token)):
            entry = out.setdefault(item.group, {"group": item.group, "first_expert": item.first_expert, "w13": {}, "w2": {}})
            entry[item.name][item.layer] = tensor_from_proto(item.tensor)
        return out
    finally:
        channel.close()


def worker_stats(endpoint: dict, timeout_s: float = 5.0, auth_token: str | None = None, **tls) -> dict:
    """WorkerControl.Stats over gRPC (for callers without a Ray handle)."""
    channel = _channel(endpoint, DEFAULT_MAX_MESSAGE, **tls)
    try:
        stub = pb_grpc.WorkerControlStub(channel)
        return json.loads(stub.Stats(pb.StatsRequest(), timeout=timeout_s, metadata=_auth_metadata(auth_token)).json)
    finally:
        channel.close()
