"""An expert worker in a child process of this host, without Ray: the smallest disaggregated setup
(attention here, every expert group on another device), used by the GPU test and the step-lane
benchmark. Control calls (accept_lane, stats, ...) go over a multiprocessing pipe; activations go
over the step lane.

    with spawn_worker(spec, groups) as ref:          # a WorkerRef with a pipe-backed `local`
        remote = RemoteExperts(cfg, NoTransport(), placement, {ref.worker_id: ref})
        experts = StepLaneExperts(remote, "cuda:0")
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future

import torch.multiprocessing as mp

from actors.experts.transport.base import ExpertTransport, TransportError, WorkerRef


def _serve(conn, worker_id: str, spec: dict, groups: list[int]) -> None:
    from actors.experts.worker import ExpertWorker

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
            if hasattr(worker, method):
                result = getattr(worker, method)(*args)
            else:  # diagnostics of the lane module (e.g. time_lane_compute), run on this worker
                from actors.experts import worker_lane

                result = getattr(worker_lane, method)(worker, *args)
            conn.send(("ok", result))
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            conn.send(("error", repr(exc)))


class PipeWorker:
    """ExpertWorker methods of the child process, called over the pipe (one call at a time)."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def __getattr__(self, method: str):
        def call(*args):
            with self._lock:
                self._conn.send((method, args))
                status, value = self._conn.recv()
            if status != "ok":
                raise RuntimeError(value)
            return value

        return call


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


class NoTransport(ExpertTransport):
    """Per-call transport for setups with the step lane only: no fallback path (a failure is final)."""

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
        fut.set_exception(TransportError("no per-call transport in this setup"))
        return fut
