"""The combine of one MoE layer: per-group partials gathered from wherever they were computed
(workers over any carrier, the replica's own groups, the failover path) and added in ascending
GROUP order in float32 — the arithmetic of one process (GroupCompute.combined), whatever the
placement, the carrier or the order replies came in. Rows: a partial of a split group covers
only its holder's rows (index_add_), otherwise every row of the layer.

Shape legend: T = tokens of the layer, T' = rows of one partial, D = hidden, n = groups.
"""

from __future__ import annotations

import torch


class GroupParts:
    def __init__(self) -> None:
        self._parts: dict[int, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}

    def add(self, g: int, partial: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """partial [T', D] of group g (rows [T'] of the layer, None = all T in order)."""
        self._parts.setdefault(g, []).append((rows, partial))

    def add_all(self, groups, partials: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """partials [n, T', D] of `groups`, in that order."""
        for i, g in enumerate(groups):
            self.add(g, partials[i], rows)

    def __len__(self) -> int:
        return len(self._parts)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[T, D] in x.dtype."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for g in sorted(self._parts):
            for rows, partial in self._parts[g]:
                if rows is None:
                    out += partial.float()
                else:
                    out.index_add_(0, rows, partial.float())
        return out.to(x.dtype)
