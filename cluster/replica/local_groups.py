"""The replica's own expert groups in an elastic cluster (elastic.local_groups): what it loads at
start, and what it fetches when a staged placement gives "local" groups it does not hold.

At start a replica loads the groups the placement gives "local" from the checkpoint (every replica
has the model source) and advertises its copy lane in Redis, so the controller can point a new
worker at it. When an epoch moves groups back (scale-down), the listener thread fetches them from
their current holder before staging, through the chain of elastic.migration_source (the operation
in flight may override it in the controller's state), and only then stages the placement: the
acknowledgement the controller waits for means "holds them and routes locally".
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import torch

from actors.device import resolve_device, resolve_dtype, sync_stream
from actors.experts.group_sources import chain_of, fetch_groups
from actors.experts.local_holder import LOCAL, LocalHolder
from actors.experts.placement import Placement
from actors.experts.worker.spec import groups_from_source, node_ip
from actors.model.config import ModelConfig
from actors.model.experts import ExpertGroupWeights
from cluster.config import MogeConfig
from cluster.elastic.worker_fleet import model_spec

log = logging.getLogger(__name__)


class ReplicaGroups:
    def __init__(self, config: MogeConfig, cfg: ModelConfig, store: Any, fleet: Any, replica_id: str) -> None:
        self.config, self.cfg, self.store, self.fleet, self.replica_id = config, cfg, store, fleet, replica_id
        self.spec = model_spec(config)
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.holder: LocalHolder | None = None
        self.fetches: list[dict] = []  # {"groups", "source", "attempts"} of each fetch (metrics, tests)

    def start(self, placement: Placement) -> LocalHolder:
        groups = list(placement.groups_of(LOCAL))
        loaded = groups_from_source(self.spec, self.cfg, groups, self.dtype, self.device) if groups else {}
        self.holder = LocalHolder(self.cfg, self.device, self.dtype, loaded, copy_host=node_ip())
        try:
            self.store.set_copy_endpoint(self.replica_id, self.holder.copy_endpoint())
        except Exception as e:  # noqa: BLE001 - Redis down: workers load from the checkpoint instead
            log.warning("could not advertise the copy lane of %s: %s", self.replica_id, e)
        return self.holder

    def prepare(self, placement: Placement, current: Placement) -> None:
        """Listener thread: fetch what `placement` adds to "local", then stage the local set."""
        assert self.holder is not None
        wanted = set(placement.groups_of(LOCAL))
        need = sorted(wanted - set(self.holder.groups))
        arrived = self._fetch(need, current, placement) if need else {}
        self.holder.stage(wanted, arrived)

    def _fetch(self, need: list[int], current: Placement, staged: Placement) -> dict[int, ExpertGroupWeights]:
        source = self.config.elastic.migration_source
        try:
            source = self.store.controller().get("migration_source") or source
        except Exception:  # noqa: BLE001 - Redis blip: the configured source
            pass
        chain = chain_of(source)
        deadline = self.config.elastic.migration_deadline_s
        by_holder: dict[str | None, list[int]] = {}
        for g in need:
            holders = [h for h in (*current.holders_of(g), *staged.holders_of(g)) if h != LOCAL]
            by_holder.setdefault(holders[0] if holders else None, []).append(g)
        out: dict[int, ExpertGroupWeights] = {}
        for holder, gs in by_holder.items():
            handle, copy = None, None
            if holder is not None:
                try:
                    handle = self.fleet.handle(holder)
                    copy = ray.get(handle.endpoint.remote(), timeout=min(10.0, deadline)).get("copy")
                except Exception as e:  # noqa: BLE001 - gone or hung: the next sources decide
                    log.info("holder %s of %s unreachable: %s", holder, gs, e)
            loaded, src, attempts = fetch_groups(
                gs, chain, self.cfg, self.dtype, self.device,
                lambda groups: groups_from_source(self.spec, self.cfg, groups, self.dtype, self.device),
                peer_copy=copy, peer_handle=handle, timeout_s=deadline)
            self.fetches.append({"groups": gs, "source": src, "attempts": attempts})
            out.update(loaded)
        # the device lane settled its own stream; the other sources copied on this thread's stream.
        # Never torch.cuda.synchronize here: it would also wait for the engine's queued steps.
        sync_stream(self.device)
        return out
