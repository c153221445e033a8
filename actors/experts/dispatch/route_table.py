"""RouteTable: one placement epoch as this replica routes it now — the live holders of every
group as holder slots, and on the device the group -> slot map, so each holder's share of a layer
is masked out of the routing ids without a host sync (SGLang's expert-location dispatch turns
logical experts into physical ones on the device the same way).

Built when the epoch switches (the step boundary) or the set of live holders changes; a per-step
route is built over the holders that also have an open step link.

  slots      live holders in placement order (the replica's own "local" holder included)
  live[g]    the slots holding group g; a group with several has its rows split into contiguous
             ranges, one per holder (split_rows); a group with none is `unrouted` (failover)
  slot_of    [T, K] the slot serving each routing slot, -1 for an unrouted group

Shape legend: T = tokens, K = slots per token, G = groups, S = holder slots.
"""

from __future__ import annotations

import torch

from actors.experts.placement import Placement, split_rows
from actors.model.config import ModelConfig


class RouteTable:
    def __init__(self, cfg: ModelConfig, placement: Placement, usable: set[str], version: int = 0) -> None:
        self.cfg, self.epoch, self.version = cfg, placement.epoch, version
        self.slots: list[str] = [w for w in placement.workers if w in usable]
        index = {w: i for i, w in enumerate(self.slots)}
        self.live: list[list[int]] = [[index[h] for h in placement.holders_of(g) if h in index]
                                      for g in range(cfg.n_groups)]
        self.unrouted: list[int] = [g for g, hs in enumerate(self.live) if not hs]
        self.split = any(len(hs) > 1 for hs in self.live)
        self.owner_g: list[int] = [hs[0] if len(hs) == 1 else -1 for hs in self.live]
        # slot -> its groups, ascending (what it is asked for, and what its reply holds)
        self.groups_of: list[tuple[int, ...]] = [tuple(g for g, hs in enumerate(self.live) if s in hs)
                                                 for s in range(len(self.slots))]
        self._owner: dict[torch.device, torch.Tensor] = {}
        self._rows: dict[tuple[torch.device, int], torch.Tensor] = {}

    @property
    def whole(self) -> bool:
        """One slot serves every group (its reply can be their sum)."""
        return len(self.slots) == 1 and not self.unrouted

    def signature(self) -> tuple:
        """What routing through this table depends on (not the epoch number: a republished map
        routes the same way)."""
        return (tuple(self.slots), tuple(self.live), tuple(self.groups_of))

    def owner(self, device: torch.device) -> torch.Tensor:
        """[G] slot per group on `device` (-1: split or unrouted), made once per table (before any
        CUDA-graph capture: the eager warm-up of a bucket runs first)."""
        owner = self._owner.get(device)
        if owner is None:
            t = torch.tensor(self.owner_g, dtype=torch.int64)
            owner = self._owner[device] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
        return owner

    def owner_rows(self, t: int, device: torch.device) -> torch.Tensor:
        """[G, t] slot per (group, row) when groups are split between holders (cached per t)."""
        table = self._rows.get((device, t))
        if table is None:
            table = torch.full((self.cfg.n_groups, t), -1, dtype=torch.int64)
            for g, hs in enumerate(self.live):
                if len(hs) == 1:
                    table[g] = hs[0]
                elif hs:
                    for s, (a, b) in zip(hs, split_rows(t, len(hs))):
                        table[g, a:b] = s
            table = self._rows[(device, t)] = table.to(device)
        return table

    def slot_of(self, ids: torch.Tensor) -> torch.Tensor:
        """[T, K] the slot serving each routing slot (-1: its group has no live holder here)."""
        group_of = ids // self.cfg.experts_per_group
        if not self.split:
            return self.owner(ids.device)[group_of]
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(group_of)
        return self.owner_rows(ids.shape[0], ids.device)[group_of, rows]

    def masked(self, ids: torch.Tensor, slot_of: torch.Tensor | None, s: int) -> torch.Tensor:
        """ids with every routing slot not served by slot s set to -1 (unchanged when s serves all)."""
        if self.whole:
            return ids
        return torch.where(slot_of == s, ids, -1)
