"""LocalExperts: the ExpertCompute of one process holding the groups itself (the single-process
model, a replica serving in process). Its arithmetic is GroupCompute's: per-group partials added
in ascending group order in float32 — what every distributed combine reproduces, so results can
match bit for bit.

Shape legend: T = tokens, D = hidden, K = slots per token.
"""

from __future__ import annotations

import torch

from actors.model.config import ModelConfig
from actors.model.expert_compute import Done, ExpertCompute, PendingExperts
from actors.model.experts import ExpertGroupWeights
from actors.model.group_compute import GroupCompute


class LocalExperts(ExpertCompute):
    def __init__(self, cfg: ModelConfig, groups: dict[int, ExpertGroupWeights]) -> None:
        self.cfg = cfg
        self.compute = GroupCompute(cfg, groups)
        # every group held: no held-set check (which would read ids on the host); MoGE routes every
        # token to every group, so a partial MoGE set is refused without reading the ids either
        self._check = None if len(self.compute.held) == cfg.n_groups else (
            self._refuse if cfg.family == "moge" else self._check_topk)

    @property
    def groups(self) -> dict[int, ExpertGroupWeights]:
        return self.compute.groups

    @property
    def nbytes(self) -> int:
        return self.compute.nbytes

    @property
    def graph_safe(self) -> bool:
        """Can a step through these experts be captured in a CUDA graph? Every group held,
        consecutive (one stacked pass per layer) and the fused CUDA path (no per-expert loop sized
        on the host)."""
        return self.compute.all_stacked and self.compute.fused

    def dispatch(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingExperts:
        if self._check is not None:
            self._check(topk_ids)
        return Done(self.compute.combined(layer, x, topk_ids, topk_weights))

    def _refuse(self, topk_ids: torch.Tensor) -> None:
        self._missing([g for g in range(self.cfg.n_groups) if g not in self.compute.groups])

    def _check_topk(self, topk_ids: torch.Tensor) -> None:
        # a host sync, only for partial holders of top-k models (tests, debugging)
        needed = torch.unique(topk_ids // self.cfg.experts_per_group).tolist()
        self._missing([g for g in needed if g not in self.compute.groups])

    @staticmethod
    def _missing(groups: list[int]) -> None:
        if groups:
            raise KeyError(f"expert groups {groups} are not held by this LocalExperts")
