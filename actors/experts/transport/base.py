"""How activations move between an attention replica and expert workers: one interface, three
implementations chosen by `data_plane.transport` (grpc, collective, inprocess; factory.py picks one).

Control (load/drop groups, stats) always goes through Ray actor calls; a transport only carries
the per-layer expert call. Calls are asynchronous: `call` returns a Future so a replica dispatches
to every holder at once (and the ping-pong runner overlaps the other micro-batch's attention).

Shape legend: T = tokens of the call, D = hidden, k = expert slots per token, n = groups in the call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch


class TransportError(RuntimeError):
    """The call did not complete (worker gone, deadline passed, connection broken). The caller
    retries on another holder or a replacement (invariant 4)."""


class GroupNotHeld(KeyError):
    """A worker was asked for groups it does not hold (the caller's placement is stale). Lives here,
    not in worker.py, so a transport can map it to its wire error without importing the worker."""


@dataclass
class WorkerRef:
    """A worker as a replica knows it. `handle` is the Ray actor (None in-process), `local` the
    ExpertWorker object itself (in-process only), `endpoint` what ExpertWorker.endpoint() said."""

    worker_id: str
    handle: Any = None
    endpoint: dict = field(default_factory=dict)
    local: Any = None

    def invoke(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Run an ExpertWorker method wherever the worker lives (Ray call or direct)."""
        if self.local is not None:
            return getattr(self.local, method)(*args)
        import ray

        return ray.get(getattr(self.handle, method).remote(*args), timeout=timeout)


class ExpertTransport(ABC):
    name: str = ""

    @abstractmethod
    def connect(self, worker: WorkerRef) -> None:
        """Open the path to `worker` (idempotent per worker id; reconnects if the endpoint changed)."""

    @abstractmethod
    def disconnect(self, worker_id: str) -> None:
        """Close the path to a worker; other workers' paths are untouched. Safe if already gone."""

    @abstractmethod
    def call(
        self,
        worker_id: str,
        layer: int,
        group_ids: list[int],
        x: torch.Tensor,  # [T, D]
        ids: torch.Tensor,  # [T, k] int64 global expert ids
        weights: torch.Tensor,  # [T, k] float32
    ) -> "Future[torch.Tensor]":
        """Future of [n, T, D] per-group partials on the caller's device, in x.dtype.
        Failures surface as TransportError (or the worker's own error) from .result()."""

    def close(self) -> None:
        for worker_id in list(self.connected()):
            self.disconnect(worker_id)

    @abstractmethod
    def connected(self) -> list[str]:
        """Ids of the workers this transport has a path to."""
