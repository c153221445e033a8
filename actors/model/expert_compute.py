"""The seam between the model and wherever its routed experts run, declared in full.

The model computes routing itself (router, per-group top-K/G or top-k) and hands the tokens to an
ExpertCompute. In one process that is LocalExperts (actors/model/experts.py); in the cluster it is
the Dispatcher (actors/experts/dispatch/), which sends each group's tokens to a holder of the group
and adds the partials back in group order. The model file never knows which.

Every member the engine calls is declared here with a default that does nothing, so the engine
calls them unconditionally (no probing with getattr): `dispatch` is the one a subclass must
write; the step hooks matter to a dispatcher with placement epochs and per-step carriers; the graph
hooks to one whose transport operations sit inside a captured decode step (the step lane on nccl).

Shape legend: T = tokens, D = hidden size, K = experts kept per token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch


class PendingExperts(Protocol):
    def wait(self) -> torch.Tensor:
        """[T, D] sum over kept experts of weight * expert(x); blocks until every group answered."""
        ...


class ExpertCompute(ABC):
    # True when dispatch(...).wait() only launches device work whose shapes follow from its inputs'
    # shapes and never waits on the host: the model runner may capture whole decode steps in a CUDA
    # graph (LocalExperts on CUDA holding every group; the step lane over nccl).
    graph_safe: bool = False
    # True when transport operations are captured inside the step (the step lane): the graph hooks
    # below then carry the header and the deadline, ping-pong steps may be captured too, and a
    # failed capture is survivable (nothing captured ran, the workers saw nothing).
    graph_carrier: bool = False

    @abstractmethod
    def dispatch(
        self,
        layer: int,
        x: torch.Tensor,  # [T, D] activations after the post-attention norm
        topk_ids: torch.Tensor,  # [T, K] int64 global expert ids
        topk_weights: torch.Tensor,  # [T, K] float32 routing weights (already scaled / renormalised)
    ) -> PendingExperts:
        """Start the routed-expert computation; may return before it is done (ping-pong)."""

    # ---- steps ---------------------------------------------------------------------------------

    def on_step_boundary(self) -> int | None:
        """Between two steps, before the next one launches anything: a staged placement becomes
        current (invariant 2). -> the epoch in force (None: no placement)."""
        return None

    def begin_step(self, counts: list[int]) -> None:
        """The step's micro-batches (token counts in dispatch order) before its first MoE layer."""

    # ---- CUDA graphs of whole decode steps (graph_carrier) -------------------------------------

    def graph_prepare(self, key, counts: list[int]) -> bool:
        """Before capturing bucket `key` (micro-batch token counts `counts`). False: do not capture."""
        return True

    def graph_captured(self, key, ok: bool = True) -> None:
        """After capturing bucket `key` (ok False: the capture failed and was thrown away)."""

    def graph_begin(self, key) -> bool:
        """Before replaying bucket `key`. False: run this step eagerly instead."""
        return True

    def graph_end(self) -> None:
        """After a replay; may raise StepRerun."""

    # ---- the rest of a replica's life ----------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Device bytes of expert weights held in this process (the KV budget subtracts them)."""
        return 0

    def metrics(self, reset: bool = False) -> dict:
        return {}

    def close(self) -> None:
        pass


class Done:
    """A PendingExperts whose result is already there (local compute)."""

    def __init__(self, y: torch.Tensor) -> None:
        self._y = y

    def wait(self) -> torch.Tensor:
        return self._y


class StepRerun(RuntimeError):
    """Raised by an ExpertCompute whose device-side transport failed asynchronously during a step
    (the results of the step cannot be trusted): the model runner runs the step once more, by
    which time the failed worker's groups go another way. KV writes of a step are idempotent."""
