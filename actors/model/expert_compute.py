"""The seam between the model and wherever its routed experts run.

The model computes routing itself (router, per-group top-K/G or top-k) and hands the tokens to an
ExpertCompute. In one process that is LocalExperts (actors/model/experts.py); in the cluster it is a
dispatcher that sends each group's tokens to a worker holding the group and sums the partials.
The model file never knows which.

Shape legend: T = tokens, D = hidden size, K = experts kept per token.
"""

from __future__ import annotations

from typing import Protocol

import torch


class PendingExperts(Protocol):
    def wait(self) -> torch.Tensor:
        """[T, D] sum over kept experts of weight * expert(x); blocks until every group answered."""
        ...


class ExpertCompute(Protocol):
    """Optional capability, read with getattr (absent = False): `graph_safe: bool`, true when
    dispatch(...).wait() only launches device work whose shapes follow from its inputs' shapes and
    never waits on the host, so the model runner may capture whole decode steps in a CUDA graph
    (LocalExperts on CUDA holding every group; a graph-capable device transport may set it too)."""

    def dispatch(
        self,
        layer: int,
        x: torch.Tensor,  # [T, D] activations after the post-attention norm
        topk_ids: torch.Tensor,  # [T, K] int64 global expert ids
        topk_weights: torch.Tensor,  # [T, K] float32 routing weights (already scaled / renormalised)
    ) -> PendingExperts:
        """Start the routed-expert computation; may return before it is done (ping-pong)."""
        ...


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
