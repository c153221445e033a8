"""Routed experts: one group's weights, the kernel that computes them, and the in-process
ExpertCompute.

Shape legend: T = tokens, D = hidden size, I = expert intermediate size, Eg = experts in the group,
k = expert slots per token handed to the group, A = (token, expert) assignments of the group.

An expert is SwiGLU: down(silu(gate(x)) * up(x)). Gate and up rows are stored stacked in one
tensor (w13) so an expert is two matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from actors.model import kernels
from actors.model.expert_compute import Done, PendingExperts
from actors.model.config import ModelConfig


@dataclass
class ExpertGroupWeights:
    """The experts of one group, for every MoE layer (dense layers have no entry)."""

    group: int
    first_expert: int  # global id of local expert 0
    w13: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [Eg, 2I, D] gate rows, then up
    w2: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [Eg, D, I]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.w13, self.w2) for t in d.values())

    def __getstate__(self) -> dict:
        # LocalExperts may turn these tensors into views of a stack of several groups; pickling a
        # view would ship the whole stack, so compact views first.
        state = dict(self.__dict__)
        for key in ("w13", "w2"):
            state[key] = {layer: _compact(t) for layer, t in state[key].items()}
        return state

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "ExpertGroupWeights":
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return ExpertGroupWeights(
            self.group,
            self.first_expert,
            {layer: move(t) for layer, t in self.w13.items()},
            {layer: move(t) for layer, t in self.w2.items()},
        )


def _compact(t: torch.Tensor) -> torch.Tensor:
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole and t.is_contiguous() else t.clone()


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    # torch._grouped_mm is a CUDA (sm90+) bf16 kernel; everything else takes the per-expert path.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def group_forward(
    w13: torch.Tensor,  # [Eg, 2I, D]
    w2: torch.Tensor,  # [Eg, D, I]
    x: torch.Tensor,  # [T, D]
    local_ids: torch.Tensor,  # [T, k] int64, ids local to the group; outside [0, Eg) = not ours
    weights: torch.Tensor,  # [T, k] float32
) -> torch.Tensor:
    """[T, D] in x.dtype: Σ_k weight · expert_k(x) over this group's experts only."""
    if kernels.fused(x):  # same per-slot arithmetic as LocalExperts' fused path: partials match
        from actors.model.kernels.moe import fused_moe

        return fused_moe(x, w13, w2, local_ids, weights, experts_per_group=w13.shape[0], n_groups=1)
    return slot_outputs(w13, w2, x, local_ids, weights).sum(dim=1).to(x.dtype)


def slot_outputs(
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    x: torch.Tensor,  # [T, D]
    local_ids: torch.Tensor,  # [T, k] int64; outside [0, E) = not computed here
    weights: torch.Tensor,  # [T, k] float32
) -> torch.Tensor:
    """[T, k, D] float32: weight · expert(x) of every slot, zero for slots outside [0, E).

    No host sync on CUDA: slots that are not ours get a sentinel id that sorts last, so every
    shape is static; their rows are computed by nobody and masked out. Each slot's result lands in
    its own row of a [T, k, D] buffer (a permutation, not atomics) and is summed over k, so the
    result is deterministic and identical whichever subset of slots the caller passes.
    """
    t, d = x.shape
    n_local, k = w13.shape[0], local_ids.shape[1]
    flat = local_ids.reshape(-1)  # [T*k]
    key = torch.where((flat >= 0) & (flat < n_local), flat, n_local)
    key, order = torch.sort(key, stable=True)  # our slots first, grouped by expert
    xs = x[order // k]  # [T*k, D]
    ends = torch.searchsorted(key, torch.arange(1, n_local + 1, device=x.device))  # [Eg] end row per expert

    if kernels.batch_invariant():  # fixed row blocks, no kernel chosen by the row count
        from actors.model.kernels.invariant import grouped_swiglu

        bounds = [0] + ends.tolist()  # one host sync
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        ys = torch.zeros_like(xs)
        ys[: bounds[-1]] = grouped_swiglu(xs[: bounds[-1]], w13, w2, counts)
    elif _grouped_mm_usable(x):
        ys = _grouped_swiglu(w13, w2, xs, ends)
    else:
        ys = torch.zeros_like(xs)
        start = 0
        for e, end in enumerate(ends.tolist()):  # one host sync; the loop is over experts, not tokens
            if end > start:
                gate, up = F.linear(xs[start:end], w13[e]).chunk(2, dim=-1)
                ys[start:end] = F.linear(F.silu(gate) * up, w2[e])
            start = end

    ours = (key < n_local).unsqueeze(1)
    contrib = torch.where(ours, ys.float() * weights.reshape(-1)[order].unsqueeze(1), 0.0)  # [T*k, D]
    slots = torch.empty_like(contrib)
    slots[order] = contrib
    return slots.view(t, k, d)


def _grouped_swiglu(w13: torch.Tensor, w2: torch.Tensor, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """One grouped matmul per projection over every expert of the group; xs sorted by expert.
    Rows past ends[-1] (other groups' slots) are left unwritten."""
    offs = ends.to(torch.int32)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [A, 2I]
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)  # [A, D]


class LocalExperts:
    """ExpertCompute in one process: every group held here, computed one after another, partials
    (x.dtype) summed in float32 in ascending group order — the arithmetic a distributed combine
    reproduces, so its results can match bit for bit."""

    def __init__(self, cfg: ModelConfig, groups: dict[int, ExpertGroupWeights]) -> None:
        self.cfg = cfg
        self.groups = dict(sorted(groups.items()))
        self._stacked = self._stack_consecutive()

    def _stack_consecutive(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (w13 [E_held, 2I, D], w2) when the held groups are consecutive, so one sort and
        one grouped matmul pair serve every group (a decode step is launch-bound otherwise). The
        groups' own tensors are re-pointed at views of the stack: no second copy is kept."""
        ids = list(self.groups)
        if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
            return {}
        if len(ids) == 1:
            g = self.groups[ids[0]]
            return {layer: (g.w13[layer], g.w2[layer]) for layer in g.w13}
        stacked = {}
        for layer in self.groups[ids[0]].w13:
            w13 = torch.cat([g.w13[layer] for g in self.groups.values()])
            w2 = torch.cat([g.w2[layer] for g in self.groups.values()])
            eg = self.cfg.experts_per_group
            for i, g in enumerate(self.groups.values()):
                g.w13[layer], g.w2[layer] = w13[i * eg : (i + 1) * eg], w2[i * eg : (i + 1) * eg]
            stacked[layer] = (w13, w2)
        return stacked

    def dispatch(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingExperts:
        self._check_held(topk_ids)
        if layer in self._stacked and kernels.fused(x):
            from actors.model.kernels.moe import fused_moe

            w13, w2 = self._stacked[layer]
            first = next(iter(self.groups.values())).first_expert
            eg = self.cfg.experts_per_group
            return Done(fused_moe(x, w13, w2, topk_ids - first, topk_weights, eg, len(self.groups)))
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for partial in self.group_partials(layer, x, topk_ids, topk_weights).values():
            out += partial.float()
        return Done(out.to(x.dtype))

    def group_partials(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """{group: [T, D] in x.dtype} for every held group, ascending: what a caller sums in group
        order in float32 (dispatch here; RemoteExperts when some groups are held in process).
        With the fused kernels each group goes through group_forward, as on an expert worker, so a
        group's partial is the same wherever it is computed."""
        if layer in self._stacked and not kernels.fused(x):
            return self._partials_stacked(layer, x, topk_ids, topk_weights)
        out = {}
        for g, weights in self.groups.items():
            ids, w = topk_ids, topk_weights
            if self.cfg.family == "moge":  # MoGE slots come ordered by group: pass only ours
                kg = self.cfg.k_per_group
                ids, w = ids[:, g * kg : (g + 1) * kg], w[:, g * kg : (g + 1) * kg]
            out[g] = group_forward(weights.w13[layer], weights.w2[layer], x, ids - weights.first_expert, w)
        return out

    def _partials_stacked(self, layer, x, topk_ids, topk_weights) -> dict[int, torch.Tensor]:
        """Same per-group partials as the loop above (each group's slots summed, cast to x.dtype),
        computed in one pass."""
        w13, w2 = self._stacked[layer]
        first = next(iter(self.groups.values())).first_expert
        slots = slot_outputs(w13, w2, x, topk_ids - first, topk_weights)  # [T, K, D] float32
        slot_group = topk_ids // self.cfg.experts_per_group  # [T, K]
        out = {}
        for g in self.groups:
            if self.cfg.family == "moge":
                kg = self.cfg.k_per_group
                partial = slots[:, g * kg : (g + 1) * kg].sum(dim=1)
            else:
                partial = (slots * (slot_group == g).unsqueeze(-1)).sum(dim=1)
            out[g] = partial.to(x.dtype)
        return out

    @property
    def graph_safe(self) -> bool:
        """Can a step through these experts be captured in a CUDA graph? Every group held (no
        held-set check that reads ids on the host), consecutive (one stacked pass per layer) and the
        fused CUDA path (no per-expert loop sized on the host)."""
        if len(self.groups) != self.cfg.n_groups or not self._stacked:
            return False
        w13 = next(iter(self._stacked.values()))[0]
        return kernels.fused(w13)

    def _check_held(self, topk_ids: torch.Tensor) -> None:
        if len(self.groups) == self.cfg.n_groups:
            return
        if self.cfg.family == "moge":  # every token visits every group
            needed = range(self.cfg.n_groups)
        else:  # costs a host sync, only for partial holders of top-k models (tests, debugging)
            needed = torch.unique(topk_ids // self.cfg.experts_per_group).tolist()
        missing = [g for g in needed if g not in self.groups]
        if missing:
            raise KeyError(f"expert groups {missing} are not held by this LocalExperts")

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.groups.values())
