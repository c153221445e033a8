"""Per-group token counts and the imbalance score, per MoE layer (metrics of the data plane).

IS = (max_g T_g - min_g T_g) / |X| (docs/architecture.md), with T_g the tokens routed to group g and |X| the
tokens of the layer, both summed since the last reset. MoGE routing gives IS = 0 by construction;
top-k checkpoints show their skew here.
"""

from __future__ import annotations

import threading

from actors.model.routing import imbalance_score


class GroupLoad:
    def __init__(self, n_groups: int) -> None:
        self.n_groups = n_groups
        self._lock = threading.Lock()
        self._group_tokens: dict[int, list[int]] = {}  # layer -> [G]
        self._tokens: dict[int, int] = {}  # layer -> |X|

    def record(self, layer: int, group_tokens: list[int], tokens: int) -> None:
        with self._lock:
            acc = self._group_tokens.setdefault(layer, [0] * self.n_groups)
            for g, n in enumerate(group_tokens):
                acc[g] += n
            self._tokens[layer] = self._tokens.get(layer, 0) + tokens

    def snapshot(self, reset: bool = False) -> dict:
        """{"group_tokens": {layer: [T_g]}, "tokens": {layer: |X|}, "imbalance": {layer: IS}}."""
        with self._lock:
            group_tokens = {layer: list(v) for layer, v in self._group_tokens.items()}
            tokens = dict(self._tokens)
            if reset:
                self._group_tokens.clear()
                self._tokens.clear()
        return {
            "group_tokens": group_tokens,
            "tokens": tokens,
            "imbalance": {layer: imbalance_score(v, tokens[layer]) for layer, v in group_tokens.items()},
        }
