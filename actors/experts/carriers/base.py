"""Carriers: how activations move between an attention replica and its expert holders. The
Dispatcher (actors/experts/dispatch/) decides what goes where; a carrier only moves it, and never
reaches into the dispatcher's or the worker's state.

Two small interfaces:

  Carrier       per call: `call(worker, layer, groups, x, ids, weights)` -> Future of the groups'
                partials [n, T, D]. In process, gRPC (unary Compute), collective (a pair of
                communicators per replica and worker). Also the path every failover takes.
  StepCarrier   per step: at the step boundary `sync` keeps one link per live worker; a step is
                one header per link (`StepHeader`), then per MoE layer and micro-batch one message
                out per link and the link's partials back. The step lane (lane/: a 2-rank
                communicator, nccl between GPUs) and the gRPC stream (one bidirectional stream).

Control (load/drop groups, stats) always goes through Ray actor calls.

Shape legend: T = tokens of the call, Tb = rows on the wire, D = hidden, K = slots per token,
n = groups of the call or link.
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
    not in the worker, so a carrier can map it to its wire error without importing the worker."""


class LinkFailed(TransportError):
    """A per-step link failed; `device_side` when the failure was only seen on the device (nccl)
    after the step's work was launched: the step's results cannot be trusted (StepRerun)."""

    def __init__(self, worker_id: str, message: str, device_side: bool = False) -> None:
        super().__init__(f"worker {worker_id}: {message}")
        self.worker_id, self.device_side = worker_id, device_side


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


class Carrier(ABC):
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
        ids: torch.Tensor,  # [T, K] int64 global expert ids, -1 = not for this call
        weights: torch.Tensor,  # [T, K] float32
    ) -> "Future[torch.Tensor]":
        """Future of [n, T, D] per-group partials on the caller's device, in x.dtype.
        Failures surface as TransportError (or the worker's own error) from .result()."""

    def close(self) -> None:
        for worker_id in list(self.connected()):
            self.disconnect(worker_id)

    @abstractmethod
    def connected(self) -> list[str]:
        """Ids of the workers this carrier has a path to."""


@dataclass(frozen=True)
class StepHeader:
    """What one link is told at the start of a step (the lane packs it into int64s, the gRPC
    stream into a message). `groups`: the link's groups, ascending: its reply is their partials
    [n, Tb, D] in x dtype, or with `whole` (one link serving every group) their sum [Tb, D]."""

    epoch: int
    n_layers: int
    counts: tuple[int, ...]  # real tokens per micro-batch, in dispatch order (1 or 2)
    rows: tuple[int, ...]  # rows per micro-batch on the wire (the lane pads to buckets)
    x_dtype: torch.dtype
    d: int
    k: int
    groups: tuple[int, ...]
    whole: bool


class StepCarrier(ABC):
    name: str = ""
    graph_safe: bool = False  # its per-layer operations may be captured in a CUDA graph

    @abstractmethod
    def sync(self, workers: dict[str, WorkerRef]) -> set[str]:
        """At the step boundary: one link to each of `workers` (new ones opened, links to others
        closed, broken ones dropped). -> the ids with an open link."""

    @abstractmethod
    def rows(self, t: int) -> int:
        """Rows a micro-batch of t tokens takes on the wire."""

    @abstractmethod
    def start(self, headers: dict[str, StepHeader]) -> set[str]:
        """Send each link its step header. -> the ids whose link failed (they are closed)."""

    @abstractmethod
    def send(self, mb: int, layer: int, x: torch.Tensor, ids: dict[str, torch.Tensor], weights: torch.Tensor) -> set[str]:
        """Post micro-batch `mb`'s layer to each link in `ids` (x [T, D], its ids [T, K] with other
        links' slots -1, weights [T, K]). -> the ids whose link failed."""

    @abstractmethod
    def receive(self, mb: int, layer: int, deadline: float, last: bool) -> dict[str, torch.Tensor | LinkFailed]:
        """Per link of the layer's send: its reply (a carrier buffer: consume before the next
        layer) or the failure. `last`: the step's last layer of this micro-batch."""

    def close(self) -> None:
        pass
