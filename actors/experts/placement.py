"""Placement: which expert workers hold which expert groups, versioned by epoch. Pure, no Ray.

Vocabulary (docs/architecture.md): G = groups of the model, D = expert workers (devices).
One rule, `plan_groups`, used both when a data plane starts (`pack_groups`) and whenever the
elastic controller scales or repairs:
  D <= G   every group on one worker; workers hold G // D or G // D + 1 groups (contiguous blocks
           from a blank start);
  D >  G   every worker holds one group; group g is replicated on workers g, g+G, g+2G, ... from a
           blank start, and its tokens are split among its holders (split_rows).
From a non-blank map the same quotas hold, but each worker keeps what it already holds wherever
the quotas allow, so a change copies as few groups as possible (2 -> 4 devices moves 4 of 8).
An attention replica adopts a new Placement only between steps (invariant 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

Groups = dict[int, tuple[str, ...]]  # group -> ids of the workers holding it, in dispatch order


@dataclass(frozen=True)
class Placement:
    epoch: int
    holders: tuple[tuple[str, ...], ...]  # holders[g]: workers holding group g, in dispatch order

    def __post_init__(self) -> None:
        if not self.holders:
            raise ValueError("a placement needs at least one group")
        for g, hs in enumerate(self.holders):
            if not hs:
                raise ValueError(f"group {g} has no holder")
            if len(set(hs)) != len(hs):
                raise ValueError(f"group {g} lists a holder twice: {hs}")

    @property
    def n_groups(self) -> int:
        return len(self.holders)

    @property
    def workers(self) -> tuple[str, ...]:
        """Every worker that holds something, in order of first appearance."""
        seen: dict[str, None] = {}
        for hs in self.holders:
            seen.update(dict.fromkeys(hs))
        return tuple(seen)

    def holders_of(self, group: int) -> tuple[str, ...]:
        return self.holders[group]

    def groups_of(self, worker: str) -> tuple[int, ...]:
        return tuple(g for g, hs in enumerate(self.holders) if worker in hs)

    def by_worker(self) -> dict[str, tuple[int, ...]]:
        return {w: self.groups_of(w) for w in self.workers}

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "holders": [list(hs) for hs in self.holders]}

    @classmethod
    def from_dict(cls, data: dict) -> "Placement":
        return cls(int(data["epoch"]), tuple(tuple(str(w) for w in hs) for hs in data["holders"]))


def plan_groups(n_groups: int, workers: Sequence[str], current: Mapping[int, Sequence[str]] | None = None) -> Groups:
    """The map of G groups over `workers` (see the module docstring for the rule). `workers` order
    breaks ties (earlier workers take the extra slots among equals); `current` is what is held now."""
    ws = list(workers)
    if n_groups < 1:
        raise ValueError("n_groups must be >= 1")
    if not ws:
        raise ValueError("a placement needs at least one worker")
    if len(set(ws)) != len(ws):
        raise ValueError(f"worker ids must be unique: {ws}")
    current = current or {}
    held = {w: sorted(g for g, hs in current.items() if w in hs and 0 <= g < n_groups) for w in ws}
    d = len(ws)
    if d <= n_groups:
        base, extra = divmod(n_groups, d)
        # Extra slots go to the workers that hold the most already: fewer groups move.
        by_holding = sorted(ws, key=lambda w: (-len(held[w]), ws.index(w)))
        slots = {w: base + (1 if i < extra else 0) for i, w in enumerate(by_holding)}
        replicas = dict.fromkeys(range(n_groups), 1)
    else:
        slots = dict.fromkeys(ws, 1)
        base, extra = divmod(d, n_groups)
        replicas = {g: base + (1 if g < extra else 0) for g in range(n_groups)}

    new: dict[int, list[str]] = {g: [] for g in range(n_groups)}
    taken = dict.fromkeys(ws, 0)
    # 1. keep what is already in place, within both quotas
    for w in ws:
        for g in held[w]:
            if taken[w] < slots[w] and len(new[g]) < replicas[g]:
                new[g].append(w)
                taken[w] += 1
    # 2. fill the free slots, fewest holders first (lowest group among equals): from a blank map
    #    this gives contiguous blocks for D <= G and round-robin replicas for D > G
    for w in ws:
        while taken[w] < slots[w]:
            candidates = [g for g in range(n_groups) if len(new[g]) < replicas[g] and w not in new[g]]
            if not candidates:
                break
            g = min(candidates, key=lambda g: (len(new[g]), g))
            new[g].append(w)
            taken[w] += 1
    missing = [g for g, hs in new.items() if not hs]
    if missing:  # cannot happen with consistent quotas; guard the invariant anyway
        raise RuntimeError(f"plan left groups without a holder: {missing}")
    return {g: tuple(hs) for g, hs in new.items()}


def pack_groups(n_groups: int, worker_ids: Sequence[str], epoch: int = 0) -> Placement:
    """Placement at start: `plan_groups` from a blank map."""
    return to_placement(epoch, plan_groups(n_groups, worker_ids))


def move_group(current: Mapping[int, Sequence[str]], group: int, worker: str, replicate: bool = False) -> Groups:
    """`group` moved to `worker` (or added to it when `replicate`); other groups unchanged. An
    operator's explicit choice, so no quota applies."""
    if group not in current:
        raise ValueError(f"unknown group {group}; groups are 0..{len(current) - 1}")
    new = {g: tuple(hs) for g, hs in current.items()}
    new[group] = tuple(dict.fromkeys([*current[group], worker])) if replicate else (worker,)
    return new


def moved_groups(old: Mapping[int, Sequence[str]], new: Mapping[int, Sequence[str]]) -> int:
    """How many (group, worker) copies must be loaded to go from old to new."""
    return sum(1 for g, hs in new.items() for w in hs if w not in old.get(g, ()))


def groups_of(placement: Placement) -> Groups:
    return {g: tuple(hs) for g, hs in enumerate(placement.holders)}


def to_placement(epoch: int, groups: Mapping[int, Sequence[str]]) -> Placement:
    return Placement(epoch, tuple(tuple(groups[g]) for g in range(len(groups))))


def split_rows(n_rows: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering n_rows, sizes differing by at most one."""
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    base, extra = divmod(n_rows, n_parts)
    out, start = [], 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out
