"""Which map of groups -> workers to move to, moving as few groups as possible.

Same shape as actors/placement.pack_groups (balanced blocks for D <= G, one group per worker and
groups replicated for D > G), but a worker keeps the groups it already holds wherever the quota
allows, so 2 -> 4 devices moves 4 of 8 groups rather than reshuffling every block.
"""

from __future__ import annotations

from typing import Mapping, Sequence

Groups = dict[int, tuple[str, ...]]


def plan_map(n_groups: int, workers: Sequence[str], current: Mapping[int, Sequence[str]]) -> Groups:
    """A balanced map over `workers` (order = preference for extra slots among equals)."""
    ws = list(dict.fromkeys(workers))
    if not ws:
        raise ValueError("plan_map needs at least one worker")
    d, g_count = len(ws), n_groups
    held: dict[str, list[int]] = {w: sorted(g for g, hs in current.items() if w in hs and 0 <= g < g_count)
                                  for w in ws}
    if d <= g_count:
        base, extra = divmod(g_count, d)
        # Extra slots go to the workers that hold the most already: fewer groups move.
        by_holding = sorted(ws, key=lambda w: (-len(held[w]), ws.index(w)))
        slots = {w: base + (1 if i < extra else 0) for i, w in enumerate(by_holding)}
        replicas = {g: 1 for g in range(g_count)}
    else:
        slots = {w: 1 for w in ws}
        base, extra = divmod(d, g_count)
        replicas = {g: base + (1 if g < extra else 0) for g in range(g_count)}

    new: dict[int, list[str]] = {g: [] for g in range(g_count)}
    # 1. keep what is already in place, within both quotas
    for w in ws:
        for g in held[w]:
            if len([x for x in new.values() if w in x]) < slots[w] and len(new[g]) < replicas[g]:
                new[g].append(w)
    # 2. fill the free slots with the groups furthest from their replica count
    for w in ws:
        while sum(1 for hs in new.values() if w in hs) < slots[w]:
            candidates = [g for g in range(g_count) if len(new[g]) < replicas[g] and w not in new[g]]
            if not candidates:
                break
            g = min(candidates, key=lambda g: (len(new[g]) - replicas[g], g))
            new[g].append(w)
    missing = [g for g, hs in new.items() if not hs]
    if missing:  # cannot happen with consistent quotas; guard the invariant anyway
        raise RuntimeError(f"plan left groups without a holder: {missing}")
    return {g: tuple(hs) for g, hs in new.items()}


def move_group(current: Mapping[int, Sequence[str]], group: int, worker: str, replicate: bool = False) -> Groups:
    """`group` moved to `worker` (or added to it when `replicate`); other groups unchanged."""
    if group not in current:
        raise ValueError(f"unknown group {group}; groups are 0..{len(current) - 1}")
    new = {g: tuple(hs) for g, hs in current.items()}
    new[group] = tuple(dict.fromkeys([*current[group], worker])) if replicate else (worker,)
    return new


def moved_groups(old: Mapping[int, Sequence[str]], new: Mapping[int, Sequence[str]]) -> int:
    """How many (group, worker) copies must be loaded to go from old to new."""
    return sum(1 for g, hs in new.items() for w in hs if w not in old.get(g, ()))
