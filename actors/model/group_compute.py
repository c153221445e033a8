"""GroupCompute: the routed-expert arithmetic of the groups one process holds, written once for
every holder — the replica in process (LocalExperts, the local holder), an expert worker's per-call
path and its step lane — so a group's partial is the same bits wherever it is computed.

    partials(layer, x, ids, w) -> [n, T, D]   one weighted partial per group, in x.dtype
    combined(layer, x, ids, w) -> [T, D]      Σ over held groups, ascending, in float32 (add_partials)

Every combine in the system adds per-group partials, each rounded to the model dtype, in ascending
group order in float32 (`add_partials`), and the fused CUDA kernel does the same in one launch
(kernels/moe.py), which is why every placement returns the single-process model's bits.

Chosen once, when the holder is built, never per call:
  stacking   consecutive held groups are stacked into one tensor per layer (one sort and one
             grouped-matmul pair per layer instead of one per group); each group's own tensors are
             re-pointed at views of the stack, so no second copy is kept.
  kernels    the fused Triton path when the weights live where kernels.fused says it runs.
  slots      MoGE: every token carries exactly K/G slots per group, in group order, so a group's
             slots are a column slice; top-k: a group's slots are found by their ids. A dispatcher
             therefore sends MoGE calls at full width K (other groups' slots id -1).

Shape legend: T = tokens, D = hidden, K = slots per token, n = groups asked for, Eg = experts per group.
"""

from __future__ import annotations

from typing import Sequence

import torch

from actors.model import kernels
from actors.model.config import ModelConfig
from actors.model.experts import ExpertGroupWeights, cat_weights, group_forward, slot_outputs


def add_partials(out: torch.Tensor, parts) -> torch.Tensor:
    """out [T, D] float32 += each partial [T, D] in order (ascending groups): THE combine."""
    for part in parts:
        out += part.float()
    return out


class MoGESlots:
    """Group g's slots are columns [g*K/G, (g+1)*K/G) of a full-width [T, K] routing."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.kg, self.width = cfg.k_per_group, cfg.top_k

    def of_group(self, ids: torch.Tensor, weights: torch.Tensor, g: int):
        s = slice(g * self.kg, (g + 1) * self.kg)
        return ids[:, s], weights[:, s]

    def group_sum(self, slots: torch.Tensor, ids: torch.Tensor, g: int) -> torch.Tensor:
        return slots[:, g * self.kg : (g + 1) * self.kg].sum(dim=1)

    def check(self, ids: torch.Tensor) -> str | None:
        if ids.shape[1] != self.width:
            return f"MoGE calls carry all {self.width} slots per token (other groups' as id -1), got {ids.shape[1]}"
        return None


class TopKSlots:
    """A group's slots are wherever its experts' ids are (other slots fall outside its range)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.eg = cfg.experts_per_group

    def of_group(self, ids: torch.Tensor, weights: torch.Tensor, g: int):
        return ids, weights

    def group_sum(self, slots: torch.Tensor, ids: torch.Tensor, g: int) -> torch.Tensor:
        return (slots * (ids // self.eg == g).unsqueeze(-1)).sum(dim=1)

    def check(self, ids: torch.Tensor) -> str | None:
        return None


def slots_of(cfg: ModelConfig):
    return MoGESlots(cfg) if cfg.family == "moge" else TopKSlots(cfg)


class GroupCompute:
    def __init__(self, cfg: ModelConfig, groups: dict[int, ExpertGroupWeights], stack: bool = True) -> None:
        self.cfg = cfg
        self.groups = dict(sorted(groups.items()))
        self.held: tuple[int, ...] = tuple(self.groups)
        self.slots = slots_of(cfg)
        self.first = self.groups[self.held[0]].first_expert if self.held else 0
        self.stacked = self._stack() if stack else {}
        sample = next((t for w in self.groups.values() for t in w.w13.values()), None)
        self.fused = sample is not None and kernels.fused(sample)
        self._index = {g: i for i, g in enumerate(self.held)}
        self._selections: dict[tuple[int, ...], torch.Tensor] = {}

    def _stack(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (w13 [E_held, 2I, D], w2) when the held groups are consecutive; the groups'
        tensors become views of the stack, layer by layer (an old stack is freed as soon as its
        last view moved)."""
        ids = list(self.held)
        if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
            return {}
        if len(ids) == 1:
            g = self.groups[ids[0]]
            return {layer: (g.w13[layer], g.w2[layer]) for layer in g.w13}
        eg = self.cfg.experts_per_group
        stacked = {}
        for layer in self.groups[ids[0]].w13:
            w13 = cat_weights([g.w13[layer] for g in self.groups.values()])
            w2 = cat_weights([g.w2[layer] for g in self.groups.values()])
            for i, g in enumerate(self.groups.values()):
                g.w13[layer], g.w2[layer] = w13[i * eg : (i + 1) * eg], w2[i * eg : (i + 1) * eg]
            stacked[layer] = (w13, w2)
        return stacked

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.groups.values())

    @property
    def all_stacked(self) -> bool:
        """Every group of the model, in one stack per layer (LocalExperts' CUDA-graph condition)."""
        return len(self.held) == self.cfg.n_groups and bool(self.stacked)

    # ---- compute -------------------------------------------------------------------------------

    def partials(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 groups: Sequence[int] | None = None) -> torch.Tensor:
        """[n, T, D] in x.dtype: partial[i] = Σ over the slots of groups[i] (default: every held
        group) of weight · expert(x). Slots of other groups, and ids -1, add nothing."""
        groups = self.held if groups is None else tuple(groups)
        if layer in self.stacked:
            every = self._stacked_partials(layer, x, ids, weights)  # [n_held, T, D]
            if groups == self.held:
                return every
            return every[self._selection(groups, every.device)]
        out = torch.empty((len(groups), *x.shape), dtype=x.dtype, device=x.device)
        for i, g in enumerate(groups):
            w = self.groups[g]
            gi, gw = self.slots.of_group(ids, weights, g)
            out[i] = group_forward(w.w13[layer], w.w2[layer], x, gi - w.first_expert, gw, self.fused)
        return out

    def _selection(self, groups: tuple[int, ...], device) -> torch.Tensor:
        """Rows of the stacked partials for `groups`, made once per set (never inside a capture)."""
        sel = self._selections.get(groups)
        if sel is None:
            sel = self._selections[groups] = torch.tensor([self._index[g] for g in groups], device=device)
        return sel

    def _stacked_partials(self, layer, x, ids, weights) -> torch.Tensor:
        w13, w2 = self.stacked[layer]
        local = ids - self.first
        if self.fused:
            from actors.model.kernels.moe import fused_moe

            return fused_moe(x, w13, w2, local, weights, self.cfg.experts_per_group, len(self.held), per_group=True)
        slots = slot_outputs(w13, w2, x, local, weights)  # [T, K, D] float32
        return torch.stack([self.slots.group_sum(slots, ids, g).to(x.dtype) for g in self.held])

    def combined(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """[T, D] in out_dtype (default x.dtype): every held group's partial added in ascending
        group order in float32 (the fused kernel does exactly that in one launch)."""
        out_dtype = out_dtype or x.dtype
        if self.fused and layer in self.stacked:
            from actors.model.kernels.moe import fused_moe

            w13, w2 = self.stacked[layer]
            return fused_moe(x, w13, w2, ids - self.first, weights, self.cfg.experts_per_group, len(self.held),
                             out_dtype=out_dtype)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return add_partials(out, self.partials(layer, x, ids, weights)).to(out_dtype)
