"""What both ends of the gRPC carrier share (protos/moge_expert.proto): tensors as raw bytes with
dtype and shape, channels, the cluster secret in metadata, and the worker's gate.

Options (transport_options on the worker, keyword arguments of the replica's carriers):
  max_message_bytes   send/receive limit, both sides (default 256 MiB)
  timeout_s           deadline of one unary call (replica)
  tls_cert, tls_key   PEM files: server identity (worker); with tls_ca on the worker, clients must
                      present a certificate signed by that CA (mutual TLS)
  tls_ca              PEM file: CA the replica trusts (and the worker checks client certs against)
  tls_server_name     replica: name expected in the worker's certificate, if not its address
  auth_token          the cluster secret (both sides): every RPC carries it in the `x-moge-auth`
                      metadata (cluster/security/cluster_secret.py creates it once per cluster)
  threads             worker: server threads (each open step stream holds one; default 32)
  max_inflight_per_peer  worker: calls one peer host may have in flight (default 8)
  max_call_tokens     worker: most tokens (rows of x) one Compute may carry (default 65536)

The gate (`Gate`) runs when a call's headers arrive, before any of its body is read: a call
without the secret is answered UNAUTHENTICATED by a handler that never reads the request (gRPC
would otherwise receive and buffer the whole message, up to the limit, before a unary handler
runs), and a peer host with `max_inflight_per_peer` calls in flight gets RESOURCE_EXHAUSTED
before its next body is read. Unary handlers are served as streaming ones for this (the wire
is the same): the body is read only once the call is admitted.
"""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

import grpc
import torch

from actors.experts.carriers.codec import decode, encode
from protos import moge_expert_pb2 as pb

DEFAULT_MAX_MESSAGE = 256 << 20
DEFAULT_THREADS = 32
DEFAULT_INFLIGHT_PER_PEER = 8
AUTH_METADATA = "x-moge-auth"


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    enc = encode(t)
    return pb.Tensor(dtype=enc.dtype, shape=list(enc.shape), data=enc.data)


def tensor_from_proto(msg: pb.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return decode(msg.dtype, list(msg.shape), msg.data, device)


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def read_file(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def hostport(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return ((AUTH_METADATA, token),) if token else None


def channel(endpoint: dict, max_bytes: int, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None):
    target = hostport(endpoint["host"], endpoint["port"])
    options = message_options(max_bytes)
    if not endpoint.get("tls"):
        return grpc.insecure_channel(target, options=options)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=read_file(tls_ca), private_key=read_file(tls_key), certificate_chain=read_file(tls_cert)
    )
    return grpc.secure_channel(target, creds, options=options)


def _peer_host(context) -> str:
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5432", "ipv6:[::1]:5432", "unix:..."
    return peer.rsplit(":", 1)[0]


class _InFlight:
    def __init__(self, limit: int) -> None:
        self.limit, self._lock, self._count = limit, threading.Lock(), {}

    def enter(self, peer: str) -> bool:
        with self._lock:
            n = self._count.get(peer, 0)
            if n >= self.limit:
                return False
            self._count[peer] = n + 1
            return True

    def leave(self, peer: str) -> None:
        with self._lock:
            n = self._count.get(peer, 1) - 1
            if n <= 0:
                self._count.pop(peer, None)
            else:
                self._count[peer] = n


class Gate(grpc.ServerInterceptor):
    """Authenticate (constant-time) and admit per peer before any request body is read."""

    def __init__(self, token: str | None, max_inflight_per_peer: int = DEFAULT_INFLIGHT_PER_PEER) -> None:
        self._token = token.encode() if token else None
        self.inflight = _InFlight(max_inflight_per_peer)
        self.refused = 0  # calls answered before their body was read (metric, tests)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        if self._token is not None and not self._authentic(details):
            return self._deny(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster secret")
        return self._admitted(handler)

    def _authentic(self, details) -> bool:
        presented = b""
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA:
                presented = value.encode("latin-1") if isinstance(value, str) else value
        return hmac.compare_digest(presented, self._token)

    def _deny(self, handler, code, message):
        def deny(request_iterator, context):  # never iterates: the body is not read
            self.refused += 1
            context.abort(code, message)

        def deny_stream(request_iterator, context):
            deny(request_iterator, context)
            yield  # pragma: no cover - makes this a generator, as a streaming response needs

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        return grpc.stream_unary_rpc_method_handler(deny)

    def _admitted(self, handler):
        gate = self

        def admit(context) -> str:
            peer = _peer_host(context)
            if not gate.inflight.enter(peer):
                gate.refused += 1
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {gate.inflight.limit} calls in flight")
            return peer

        def first(requests, context):
            try:
                return next(requests)
            except StopIteration:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")

        def unary_in(requests, context):
            peer = admit(context)
            try:
                return handler.unary_unary(first(requests, context), context)
            finally:
                gate.inflight.leave(peer)

        def unary_in_stream_out(requests, context):
            peer = admit(context)
            try:
                yield from handler.unary_stream(first(requests, context), context)
            finally:
                gate.inflight.leave(peer)

        def stream_in(requests, context):
            peer = admit(context)
            try:
                return handler.stream_unary(requests, context)
            finally:
                gate.inflight.leave(peer)

        def stream_in_stream_out(requests, context):
            peer = admit(context)
            try:
                yield from handler.stream_stream(requests, context)
            finally:
                gate.inflight.leave(peer)

        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.stream_unary_rpc_method_handler(unary_in, **kw)
        if handler.unary_stream:
            return grpc.stream_stream_rpc_method_handler(unary_in_stream_out, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(stream_in, **kw)
        return grpc.stream_stream_rpc_method_handler(stream_in_stream_out, **kw)
