"""Placement: which expert workers hold which expert groups, versioned by epoch. Pure, no Ray.

Vocabulary (DESIGN.md): G = groups of the model, D = expert workers (devices).
  D <= G   groups packed onto workers in contiguous blocks whose sizes differ by at most one;
  D >  G   every worker holds one group; group g is replicated on workers g, g+G, g+2G, ...
           and its tokens are split among its holders (split_rows).
An attention replica adopts a new Placement only between steps (invariant 2).
"""

from __future__ import annotations

from dataclasses import dataclass


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


def pack_groups(n_groups: int, worker_ids: list[str] | tuple[str, ...], epoch: int = 0) -> Placement:
    """Placement at start: G groups over D workers (see the module docstring for the rule)."""
    workers = list(worker_ids)
    if n_groups < 1:
        raise ValueError("n_groups must be >= 1")
    if not workers:
        raise ValueError("pack_groups needs at least one worker")
    if len(set(workers)) != len(workers):
        raise ValueError(f"worker ids must be unique: {workers}")
    d = len(workers)
    holders: list[list[str]] = [[] for _ in range(n_groups)]
    if d <= n_groups:
        base, extra = divmod(n_groups, d)
        g = 0
        for i, w in enumerate(workers):
            for _ in range(base + (1 if i < extra else 0)):
                holders[g].append(w)
                g += 1
    else:
        for i, w in enumerate(workers):
            holders[i % n_groups].append(w)
    return Placement(epoch, tuple(tuple(hs) for hs in holders))


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
