"""The attention replica as a holder of expert groups ("local" in the placement): the groups it
computes in its own process (GroupCompute), next to those on expert workers. This is the one
device case grown live: a single GPU starts with attention and every group here; scaling to two
moves half the groups to a worker over the device lane (this holder serves them through its
GroupCopyServer) and back again on the way down.

Changes follow the placement epochs (invariant 2): the replica's epoch listener fetches the groups
a staged placement adds to "local" (off the step path) and `stage`s them; `commit`, called at the
step boundary that swaps the placement in, builds the GroupCompute of the new set and lets go of
the groups that left. Every replica holds its own "local" copy, so dropping at its own swap is
safe: after it no step of this replica routes to them. Its arithmetic is GroupCompute's, the same
as a worker's, so a group computed here adds the same bits as one computed anywhere else.

Memory: a group arrives once, into its final buffer (group_copy.py); at commit the kept and arrived
groups are restacked layer by layer (GroupCompute keeps consecutive groups in one tensor per layer),
each old layer stack freed as soon as its groups point at the new one, so the transient extra is
one layer's stack.
"""

from __future__ import annotations

import threading

import torch

from actors.model.config import ModelConfig
from actors.model.experts import ExpertGroupWeights
from actors.model.group_compute import GroupCompute

LOCAL = "local"  # the placement's holder id for "every attention replica, in process"


class LocalHolder:
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 groups: dict[int, ExpertGroupWeights] | None = None, copy_host: str | None = "127.0.0.1") -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self._experts: GroupCompute | None = GroupCompute(cfg, groups) if groups else None
        self._staged: tuple[frozenset[int], dict[int, ExpertGroupWeights]] | None = None
        self._lock = threading.Lock()
        self.copy_server = None
        if copy_host is not None:
            from actors.experts.group_copy import GroupCopyServer

            self.copy_server = GroupCopyServer(self.held, device, copy_host)

    # ---- what is held ------------------------------------------------------------------------------

    def held(self) -> dict[int, ExpertGroupWeights]:
        experts = self._experts
        return dict(experts.groups) if experts is not None else {}

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(self.held())

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.held().values())

    def copy_endpoint(self) -> dict | None:
        return self.copy_server.address() if self.copy_server is not None else None

    # ---- epochs ------------------------------------------------------------------------------------

    def stage(self, wanted: set[int] | frozenset[int], arrived: dict[int, ExpertGroupWeights]) -> None:
        """Listener thread: the next epoch holds `wanted` here; `arrived` has every wanted group
        not held yet (already on this device)."""
        missing = set(wanted) - set(self.held()) - set(arrived)
        if missing:
            raise ValueError(f"staging local groups {sorted(wanted)} without {sorted(missing)}")
        with self._lock:
            self._staged = (frozenset(wanted), dict(arrived))

    def commit(self) -> bool:
        """Step thread, at the boundary that makes the staged placement current. -> changed."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return False
        wanted, arrived = staged
        old = self._experts
        if old is not None and set(old.groups) == wanted and not arrived:
            return False
        groups = {g: w for g, w in (old.groups.items() if old is not None else ()) if g in wanted}
        groups.update({g: w for g, w in arrived.items() if g in wanted})
        # drop every reference to the old stacks but the kept groups' views, so each layer's old
        # stack is freed as soon as the new GroupCompute has restacked that layer
        self._experts = None
        if old is not None:
            old.stacked = {}
        del old, arrived, staged
        self._experts = GroupCompute(self.cfg, groups) if groups else None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    # ---- compute -----------------------------------------------------------------------------------

    def partials(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 groups: list[int]) -> torch.Tensor:
        """[n, T, D] x.dtype: the partials of `groups` (all held here), ascending."""
        experts = self._experts
        missing = [g for g in groups if experts is None or g not in experts.groups]
        if missing:
            raise KeyError(f"local groups {missing} are not held by this replica")
        return experts.partials(layer, x, topk_ids, topk_weights, groups)

    def close(self) -> None:
        if self.copy_server is not None:
            self.copy_server.stop()
            self.copy_server = None
