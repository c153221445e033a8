"""The expert worker's side of the step lane (wire format: wire.py; replica side: step_lane.py).

One thread per lane, i.e. per attention replica (both ping-pong micro-batches share it: the header
announces them and the loop interleaves their layers in the replica's order): it waits for a step
header, then runs the whole step's layer loop itself — recv packet -> the lane's groups' partials
for that layer (GroupCompute, the same arithmetic as every holder) -> send them back — with no
Python request per layer and no host copy. On CUDA with the
nccl backend the loop of one bucket is captured once as a CUDA graph with the point-to-point
operations inside it (the first step of a bucket runs eagerly: it warms kernels and the
communicator), so a step costs one header read and one graph replay on the host.

M:N (several replicas on one worker): every lane has its
own thread, communicator and CUDA stream and shares the (read-only) weights, so steps of different
replicas interleave on the device without waiting for each other. Merging their batches would
save a few launches but couple the replicas' step clocks (one waits for the other's tokens) and
their failure domains; the streams already overlap one lane's wait on the wire with another's
compute.

Idle lanes: a lane waits for the next header in a posted receive under a 7-day communicator
timeout (the NCCL watchdog only fires on a timed-out operation), so an idle worker never trips
it; the replica closes its lanes with an OP_CLOSE header, and `shutdown` aborts the rest.

Shape legend: Tb = bucket rows, D = hidden, K = slots per token.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

from actors.device import collective_backend
from actors.experts.carriers.pairs import abort_group, bound_store, make_group
from actors.experts.carriers.rendezvous_auth import prove
from actors.experts.lane.capture import capture_on
from actors.experts.lane.wire import HEADER_LEN, OP_CLOSE, OP_HELLO, OP_STEP, new_packet, parse_header

log = logging.getLogger(__name__)

IDLE_TIMEOUT = datetime.timedelta(days=7)
PROOF_TIMEOUT = datetime.timedelta(seconds=60)  # a joiner must prove the secret this soon
GRAPHS_ENV = "MOGE_LANE_GRAPHS"  # "0": lanes stay eager (a fallback switch for a device run)


class LaneServer:
    """Hosts the lanes' rendezvous store in the worker process and one thread per lane."""

    def __init__(self, worker, host: str, connect_timeout_s: float = 60.0) -> None:
        self.worker = worker  # its public surface: cfg, device, holding(), record()
        self.host = host
        self.store = bound_store(host, datetime.timedelta(seconds=connect_timeout_s))
        self._lanes: dict[str, WorkerLane] = {}
        self._retired = {"steps": 0, "graph_replays": 0, "wall_s": 0.0}
        self._lock = threading.Lock()

    def accept(self, lane_id: str, backend: str | None = None) -> dict:
        """Join lane `lane_id` as rank 1 in the background; the replica joins as rank 0 right after."""
        backend = backend or collective_backend(self.worker.device.type)
        lane = WorkerLane(self.worker, self.store, lane_id, backend)
        with self._lock:
            for key in [k for k, v in self._lanes.items() if not v.thread.is_alive()]:
                self._retire(self._lanes.pop(key))
            self._lanes[lane_id] = lane
        lane.thread.start()
        return {"host": self.host, "port": self.store.port, "backend": backend, "rank": 1}

    def _retire(self, lane: "WorkerLane") -> None:
        """Keep an ended lane's counts (stats are totals since the worker started)."""
        self._retired["steps"] += lane.steps
        self._retired["graph_replays"] += lane.replays
        self._retired["wall_s"] += lane.wall_s

    def stats(self) -> dict:
        with self._lock:
            lanes = list(self._lanes.values())
            retired = dict(self._retired)
        return {
            "lanes": sum(lane.thread.is_alive() for lane in lanes),
            "steps": retired["steps"] + sum(lane.steps for lane in lanes),
            "graph_replays": retired["graph_replays"] + sum(lane.replays for lane in lanes),
            "wall_s": retired["wall_s"] + sum(lane.wall_s for lane in lanes),
            "capture_errors": sorted({lane.capture_error for lane in lanes if lane.capture_error}),
        }

    def close(self, lane_id: str) -> None:
        with self._lock:
            lane = self._lanes.pop(lane_id, None)
            if lane is not None:
                self._retire(lane)
        if lane is not None:
            lane.abort()

    def stop(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.abort()


class WorkerLane:
    def __init__(self, worker, store, lane_id: str, backend: str) -> None:
        self.worker, self.store, self.lane_id, self.backend = worker, store, lane_id, backend
        self.compute_device = worker.device
        self.wire_device = worker.device if backend != "gloo" else torch.device("cpu")
        self.pg = None
        self.steps = 0
        self.replays = 0
        self.wall_s = 0.0
        self.capture_error: str | None = None
        self._graphs: dict[tuple, tuple] = {}  # ((Tb per micro-batch), n_layers, dtypes, D, K) -> (graph, buffers, groups)
        self._seen: set[tuple] = set()
        self.thread = threading.Thread(target=self._run, name=f"moge-lane-{lane_id}", daemon=True)

    # ---- loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        cuda = self.compute_device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.compute_device)
        try:
            self.pg = make_group(self.backend, dist.PrefixStore(self.lane_id, self.store), 1, IDLE_TIMEOUT)
            prove(self.pg, 1, self.wire_device, PROOF_TIMEOUT)  # a joiner without the cluster secret gets nothing
        except Exception:  # noqa: BLE001 - the replica gave up joining, or could not prove the secret
            self.abort()
            return
        self.stream = torch.cuda.Stream(self.compute_device) if cuda else None
        hdr = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire_device)
        try:
            with torch.no_grad(), (torch.cuda.stream(self.stream) if cuda else _null()):
                while True:
                    self.pg.recv([hdr], 0, 0).wait()
                    h = hdr.tolist()  # the step's one host sync on this side
                    op = h[0]
                    if op == OP_CLOSE:
                        return
                    if op == OP_HELLO:
                        continue
                    if op == OP_STEP:
                        self._step(h)
        except Exception as exc:  # noqa: BLE001 - replica gone or lane aborted: only this lane ends
            log.info("lane %s ended: %s", self.lane_id, exc)
        finally:
            # graphs holding this communicator's kernels go before the communicator does
            self._graphs.clear()
            self.abort()

    def _step(self, h: list[int]) -> None:
        start = time.perf_counter()
        self.steps += 1  # counted when the header arrives
        _, step = parse_header(h)
        # one GroupCompute snapshot per step: loads and drops replace it, never mutate it
        compute = self.worker.holding()
        missing = [g for g in step.groups if g not in compute.groups]
        if missing:  # a placement this worker does not hold: end the lane, the replica fails over
            raise RuntimeError(f"lane {self.lane_id}: asked for groups {missing} it does not hold")
        cfg = self.worker.cfg
        layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)][: step.n_layers]
        # micro-batch buckets in the replica's dispatch order (ping-pong: A then B at every layer)
        key = (step.rows, step.n_layers, step.x_dtype, step.d, step.k, step.groups, step.whole)
        entry = self._graphs.get(key)
        if entry is not None and entry[2] is compute:
            entry[0].replay()
            self.replays += 1
        else:
            self._layer_ops(layers, step, compute, self._buffers(step))
            if self._capturable(step.x_dtype) and key in self._seen and self.capture_error is None:
                try:
                    self._graphs[key] = self._capture(layers, step, compute)
                except Exception as exc:  # noqa: BLE001 - captured ops never ran: the lane stays in step, eager
                    self.capture_error = repr(exc)
                    log.warning("lane %s: CUDA graph capture failed, staying eager: %s", self.lane_id, exc)
            self._seen.add(key)
        if self.stream is not None:
            self.stream.synchronize()
        seconds = time.perf_counter() - start
        self.wall_s += seconds
        self.worker.record(list(step.groups), [sum(step.counts)] * len(step.groups), seconds)

    def _buffers(self, step) -> list[tuple]:
        """(packet, reply) per micro-batch: the two must not share, their ops are in flight together."""
        out = []
        for tb in step.rows:
            shape = (tb, step.d) if step.whole else (len(step.groups), tb, step.d)
            out.append((new_packet(tb, step.d, step.k, step.x_dtype, self.wire_device),
                        torch.empty(shape, dtype=step.x_dtype, device=self.wire_device)))
        return out

    def _layer_ops(self, layers, step, compute, bufs) -> None:
        """Per MoE layer, per micro-batch in dispatch order: recv packet, compute, send the
        partials — exactly the order the replica posts them (send A_l, recv A_l, send B_l,
        recv B_l), so one communicator carries both micro-batches without any cross-communicator
        ordering hazard."""
        dev = self.compute_device
        for layer in layers:
            for packet, reply in bufs:
                self.pg.recv([packet.buf], 0, 1).wait()
                x = packet.x.to(dev)
                ids = packet.ids.to(dev, torch.int64)
                wts = packet.weights.to(dev)
                if step.whole:
                    y = compute.combined(layer, x, ids, wts)
                else:
                    y = compute.partials(layer, x, ids, wts, step.groups)
                reply.copy_(y)
                self.pg.send([reply], 0, 2).wait()

    def _capturable(self, x_dtype) -> bool:
        # the grouped-matmul expert kernel (CUDA, bf16) has no host sync; other paths do
        return (self.backend == "nccl" and self.compute_device.type == "cuda" and x_dtype == torch.bfloat16
                and os.environ.get(GRAPHS_ENV, "1") != "0")

    def _capture(self, layers, step, compute):
        bufs = self._buffers(step)  # static buffers, allocated (and zeroed) before the capture
        self.stream.synchronize()  # the eager step just run on this stream is the warm-up
        graph = capture_on(self.stream, lambda: self._layer_ops(layers, step, compute, bufs))
        return graph, bufs, compute

    def abort(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None and self.backend != "gloo":
            abort_group(pg)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def time_lane_compute(worker, t: int, iters: int = 10) -> dict:
    """Diagnostics for the benchmark: seconds per step of the held groups' compute over every MoE
    layer for t tokens, (a) as a lane of a several-lane step runs it (per-group partials) and (b) as
    a lane serving every group does (their sum: what the monolithic engine runs), both captured in
    a CUDA graph on CUDA."""
    cfg, dev, dtype = worker.cfg, worker.device, worker.dtype
    compute = worker.holding()
    layers = [layer for layer in range(cfg.num_layers) if cfg.is_moe_layer(layer)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(t, cfg.hidden_size, generator=gen).to(dev, dtype)
    if cfg.family == "moge":
        eg = cfg.experts_per_group
        ids = torch.cat([torch.randint(0, eg, (t, cfg.k_per_group), generator=gen) + g * eg
                         for g in range(cfg.n_groups)], 1)
    else:
        ids = torch.stack([torch.randperm(cfg.n_experts, generator=gen)[: cfg.top_k] for _ in range(t)])
    ids, wts = ids.to(dev), torch.rand(ids.shape, generator=gen).to(dev)
    fns = {
        "lane_s": lambda: [compute.partials(layer, x, ids, wts) for layer in layers],
        "local_s": lambda: [compute.combined(layer, x, ids, wts) for layer in layers],
    }
    out = {}
    # stream-level syncs only: the worker's idle lanes keep NCCL header receives posted on this
    # device, so a device-wide sync (or torch.cuda.graph, which does one) would wait for the
    # replica's next step, and the replica is waiting for this call (see capture_on)
    s = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    if s is not None:
        s.wait_stream(torch.cuda.current_stream(dev))  # the inputs were made there
    ctx = (lambda: torch.cuda.stream(s)) if s is not None else _null
    sync = s.synchronize if s is not None else (lambda: None)
    with torch.no_grad(), (torch.cuda.device(dev) if s is not None else _null()):
        for name, fn in fns.items():
            with ctx():
                fn()  # warm-up on the capture stream
            sync()
            run = fn
            if s is not None and dtype == torch.bfloat16:
                graph = capture_on(s, fn)
                run = graph.replay
            with ctx():
                run()
                sync()
                start = time.perf_counter()
                for _ in range(iters):
                    run()
                sync()
            out[name] = (time.perf_counter() - start) / iters
    return out
