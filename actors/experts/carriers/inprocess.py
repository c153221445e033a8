"""In-process carrier (per call): workers are ExpertWorker objects in this process (single device, tests).

Calls run on a small thread pool so `call` is as asynchronous as the remote carriers and the
dispatch/combine code is exercised the same way.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from actors.experts.carriers.base import Carrier, TransportError, WorkerRef


class InProcessCarrier(Carrier):
    name = "inprocess"

    def __init__(self, max_threads: int = 4, **_: object) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="moge-inproc")
        self._workers: dict[str, object] = {}

    def connect(self, worker: WorkerRef) -> None:
        if worker.local is None:
            raise TransportError(f"in-process carrier needs the ExpertWorker object of {worker.worker_id}")
        self._workers[worker.worker_id] = worker.local

    def disconnect(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def connected(self) -> list[str]:
        return list(self._workers)

    def call(self, worker_id, layer, group_ids, x, ids, weights) -> "Future[torch.Tensor]":
        worker = self._workers.get(worker_id)
        if worker is None:
            fut: Future = Future()
            fut.set_exception(TransportError(f"worker {worker_id} is not connected"))
            return fut
        device = x.device
        return self._pool.submit(lambda: worker.compute(layer, list(group_ids), x, ids, weights).to(device))

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)
