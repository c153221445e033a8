"""Per-layer cost of the gRPC carriers against the wire: the per-step stream (one bidirectional
ExpertData.Steps stream per worker) and the unary per-call Compute, each against a bare loopback
gRPC round trip of the same bytes (a generic echo service: the request's bytes in, the reply's
bytes out, no tensors, no protobuf schema). The worker computes nothing (it answers zeros of the
right shape), so what is measured is the carrier: serialising, the wire, the worker's server and
decoding.

    python bench/grpc_stream_cost.py --tokens 1,8,32,256 --hidden 2048 --groups 4 --iters 200

Shapes: x [T, D] and the reply [n, T, D] in bf16, ids [T, K] int64 and weights [T, K] float32, as
the dispatcher sends them for a worker holding n groups. Loopback TCP on one host (CPU only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import torch  # noqa: E402


class NullWorker:
    """What GrpcExpertServer needs of an ExpertWorker; compute answers zeros at once."""

    def __init__(self, n: int, d: int, dtype: torch.dtype) -> None:
        self.worker_id, self.device, self.n, self.d, self.dtype = "null", torch.device("cpu"), n, d, dtype
        self._zeros: dict[tuple, torch.Tensor] = {}

    def compute(self, layer, groups, x, ids, weights, whole=False):
        shape = (x.shape[0], self.d) if whole else (len(groups), x.shape[0], self.d)
        if shape not in self._zeros:
            self._zeros[shape] = torch.zeros(shape, dtype=self.dtype)
        return self._zeros[shape]

    def held_groups(self):
        return list(range(self.n))

    def stats(self):
        return {}


def echo_server(reply: dict[int, bytes]):
    """A generic gRPC echo on loopback: unary and bidirectional stream, replies of a preset size."""

    def unary(request: bytes, context) -> bytes:
        return reply[len(request)]

    def stream(requests, context):
        for request in requests:
            yield reply[len(request)]

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
    })
    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 1 << 30),
                                                                      ("grpc.max_send_message_length", 1 << 30)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def timed(fn, iters: int) -> float:
    for _ in range(max(5, iters // 10)):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,32,256")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4, help="groups the worker answers for (its reply is [n, T, D])")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from actors.experts.carriers.base import StepHeader, WorkerRef
    from actors.experts.carriers.grpc_call import GrpcCarrier
    from actors.experts.carriers.grpc_server import GrpcExpertServer
    from actors.experts.carriers.grpc_stream import GrpcStreamCarrier
    from actors.experts.carriers.grpc_wire import tensor_to_proto
    from protos import moge_expert_pb2 as pb

    dtype, d, k, n = torch.bfloat16, args.hidden, args.slots, args.groups
    worker = NullWorker(n, d, dtype)
    server = GrpcExpertServer(worker, "127.0.0.1", {"auth_token": "bench-secret"})
    ref = WorkerRef("null", endpoint=server.address())
    per_call = GrpcCarrier(timeout_s=30, auth_token="bench-secret")
    per_call.connect(ref)
    stream = GrpcStreamCarrier(per_call)
    stream.sync({"null": ref})
    groups = list(range(n))
    rows = []
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, d).to(dtype)
        ids = torch.randint(0, 64, (t, k))
        w = torch.rand(t, k)
        request = pb.StepMessage(layer=pb.LayerInput(layer=0, micro_batch=0, x=tensor_to_proto(x),
                                                     ids=tensor_to_proto(ids), weights=tensor_to_proto(w)))
        req_bytes = request.SerializeToString()
        reply_bytes = pb.LayerOutput(y=tensor_to_proto(worker.compute(0, groups, x, ids, w))).SerializeToString()
        echo, port = echo_server({len(req_bytes): reply_bytes})
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 30),
                                                                        ("grpc.max_send_message_length", 1 << 30)])
        unary = channel.unary_unary("/bench.Echo/Unary")
        import queue

        q: queue.SimpleQueue = queue.SimpleQueue()
        responses = channel.stream_stream("/bench.Echo/Stream")(iter(q.get, None))

        def wire_stream():
            q.put(req_bytes)
            next(responses)

        header = StepHeader(0, 1, (t,), (t,), dtype, d, k, tuple(groups), False)
        stream.start({"null": header})

        def step_layer():
            stream.send(0, 0, x, {"null": ids}, w)
            got = stream.receive(0, 0, time.monotonic() + 30, False)["null"]
            assert not isinstance(got, Exception), got

        row = {
            "tokens": t, "request_bytes": len(req_bytes), "reply_bytes": len(reply_bytes),
            "wire_unary_ms": 1e3 * timed(lambda: unary(req_bytes), args.iters),
            "wire_stream_ms": 1e3 * timed(wire_stream, args.iters),
            "per_call_ms": 1e3 * timed(lambda: per_call.call("null", 0, groups, x, ids, w).result(30), args.iters),
            "stream_ms": 1e3 * timed(step_layer, args.iters),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        q.put(None)
        channel.close()
        echo.stop(None)
    stream.close()
    per_call.close()
    server.stop()
    print("\n| tokens | bytes out / back | wire, unary (ms) | wire, stream (ms) | per-call carrier (ms) | per-step stream (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['tokens']} | {r['request_bytes']} / {r['reply_bytes']} | {r['wire_unary_ms']:.3f} | "
              f"{r['wire_stream_ms']:.3f} | {r['per_call_ms']:.3f} | {r['stream_ms']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
