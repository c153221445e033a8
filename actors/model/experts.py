"""Routed experts: one group's weights and the kernel that computes them (GroupCompute,
actors/model/group_compute.py, runs it over every group a process holds; LocalExperts,
actors/model/local_experts.py, is the in-process ExpertCompute).

Shape legend: T = tokens, D = hidden size, I = expert intermediate size, Eg = experts in the group,
k = expert slots per token handed to the group, A = (token, expert) assignments of the group.

An expert is SwiGLU: down(silu(gate(x)) * up(x)). Gate and up rows are stored stacked in one
tensor (w13) so an expert is two matmuls. A weight is a tensor in the compute dtype or a BlockFp8
(block-scaled FP8, actors/model/quant/blocks.py): the kernels take either; the torch fallback
dequantizes an expert's weights where it uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from actors.model import kernels
from actors.model.quant import blocks


@dataclass
class ExpertGroupWeights:
    """The experts of one group, for every MoE layer (dense layers have no entry)."""

    group: int
    first_expert: int  # global id of local expert 0
    w13: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [Eg, 2I, D] gate rows, then up
    w2: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [Eg, D, I]

    @property
    def nbytes(self) -> int:
        return sum(blocks.nbytes(t) for d in (self.w13, self.w2) for t in d.values())

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


def _compact(t):
    if isinstance(t, blocks.BlockFp8):
        return t.map(_compact)
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
    fused: bool | None = None,
) -> torch.Tensor:
    """[T, D] in x.dtype: Σ_k weight · expert_k(x) over this group's experts only. `fused`: the
    Triton path (None: kernels.fused(x), for callers that have not chosen once)."""
    if kernels.fused(x) if fused is None else fused:  # same per-slot arithmetic as the stacked fused path
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
    elif _grouped_mm_usable(x) and isinstance(w13, torch.Tensor):
        ys = _grouped_swiglu(w13, w2, xs, ends)
    else:
        ys = torch.zeros_like(xs)
        start = 0
        for e, end in enumerate(ends.tolist()):  # one host sync; the loop is over experts, not tokens
            if end > start:
                gate, up = F.linear(xs[start:end], blocks.as_dense(w13[e], x.dtype)).chunk(2, dim=-1)
                ys[start:end] = F.linear(F.silu(gate) * up, blocks.as_dense(w2[e], x.dtype))
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


def cat_weights(weights: list):
    """Stack expert weights along the expert dimension: tensors, or BlockFp8 with their scales."""
    return blocks.cat(weights) if isinstance(weights[0], blocks.BlockFp8) else torch.cat(weights)
