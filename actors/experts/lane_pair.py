"""An expert worker in a child process of this host, without Ray: the smallest disaggregated setup
(attention here, every expert group on another device), used by the GPU test and the step-lane
benchmark. Control calls (accept_lane, stats, ...) go over a multiprocessing pipe; activations go
over the step lane.

    with spawn_worker(spec, groups) as ref:          # a WorkerRef with a pipe-backed `local`
        experts = Dispatcher(cfg, NoCarrier(), placement, {ref.worker_id: ref},
                             step_carrier=LaneCarrier("cuda:0"))
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future

import torch.multiprocessing as mp

from actors.experts.carriers.base import Carrier, TransportError, WorkerRef


def _serve(conn, worker_id: str, spec: dict, groups: list[int]) -> None:
    from actors.experts.worker.worker import ExpertWorker

    worker = ExpertWorker(worker_id, spec, transport="inprocess", transport_options={"host": "127.0.0.1"})
    worker.load_groups(groups)
    worker.warmup()
    conn.send(("ready", worker.held_groups()))
    while True:
        method, args = conn.recv()
        if method == "exit":
            worker.shutdown()
            conn.send(("ok", None))
            return
        try:
            if method == "time_lane_compute":  # diagnostics of the lane module, run on this worker
                from actors.experts.lane.worker_lane import time_lane_compute

                result = time_lane_compute(worker, *args)
            else:
                result = getattr(worker, method)(*args)
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            conn.send(("error", repr(exc)))


class PipeWorker:
    """The ExpertWorker methods a replica's step lane and the benchmarks call, run in the child
    process over the pipe (one call at a time)."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def _call(self, method: str, *args):
        with self._lock:
            self._conn.send((method, args))
            status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def accept_lane(self, lane_id: str, backend: str | None = None) -> dict:
        return self._call("accept_lane", lane_id, backend)

    def close_lane(self, lane_id: str) -> None:
        return self._call("close_lane", lane_id)

    def lane_stats(self) -> dict:
        return self._call("lane_stats")

    def stats(self) -> dict:
        return self._call("stats")

    def held_groups(self) -> list[int]:
        return self._call("held_groups")

    def endpoint(self) -> dict:
        return self._call("endpoint")

    def time_lane_compute(self, t: int, iters: int = 10) -> dict:
        return self._call("time_lane_compute", t, iters)


@contextlib.contextmanager
def spawn_worker(spec: dict, groups: list[int], worker_id: str = "w0", ready_timeout_s: float = 600.0):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, worker_id, spec, groups), daemon=True)
    proc.start()
    try:
        if not parent.poll(ready_timeout_s):
            raise TimeoutError("expert worker process did not start")
        status, _ = parent.recv()
        yield WorkerRef(worker_id, local=PipeWorker(parent), endpoint={"transport": "lane"})
    finally:
        try:
            parent.send(("exit", ()))
            parent.poll(10) and parent.recv()
        except (OSError, EOFError):
            pass
        proc.join(10)
        if proc.is_alive():
            proc.kill()


class NoCarrier(Carrier):
    """Per-call carrier for setups with the step lane only: no fallback path (a failure is final)."""

    name = "none"

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def connect(self, worker: WorkerRef) -> None:
        self._ids.add(worker.worker_id)

    def disconnect(self, worker_id: str) -> None:
        self._ids.discard(worker_id)

    def connected(self) -> list[str]:
        return sorted(self._ids)

    def call(self, worker_id, layer, group_ids, x, ids, weights) -> Future:
        fut: Future = Future()
        fut.set_exception(TransportError("no per-call carrier in this setup"))
        return fut
