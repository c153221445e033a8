"""An attention replica's side of the elastic cluster: its Dispatcher built from the placement in
Redis, the epoch listener that swaps placements at step boundaries, and the metrics reporter.

    er = ElasticReplica.connect(config, replica_id)          # before the engine is built
    engine, loaded = build_engine(config, experts=er.experts)   # cluster/replica/assemble.py
    async_engine = AsyncEngine(engine)
    er.attach(async_engine, metrics)                          # after
    ...
    er.close()

The replica registers itself (acknowledging epoch -1) *before* it reads the placement, so a
controller that publishes a newer epoch meanwhile waits for this replica too (invariant 3).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from actors.experts.dispatch.dispatcher import Dispatcher
from actors.experts.local_holder import LOCAL
from actors.experts.placement import Placement
from actors.experts.worker.spec import model_config_of
from cluster.config import MogeConfig
from cluster.elastic.epoch_listener import EpochListener
from cluster.elastic.metrics_reporter import ReplicaReporter
from cluster.elastic.redis_server import connect
from cluster.elastic.store import ElasticStore
from cluster.elastic.worker_fleet import WorkerFleet, model_spec
from cluster.replica.dispatcher import build_dispatcher
from cluster.replica.local_groups import ReplicaGroups
from cluster.replica.plan import ReplicaPlan
from cluster.replica.workers import WORKER_NAMESPACE, ReplicaWorkers

log = logging.getLogger(__name__)


def replica_id_from_serve() -> str:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or rid)
    except Exception:  # noqa: BLE001 - outside Serve (tests, scripts)
        return f"replica-{uuid.uuid4().hex[:8]}"


def _placement_at_start(store: ElasticStore, namespace: str | None, timeout_s: float) -> Placement:
    """From Redis; if Redis is down, from the controller; bounded wait for bootstrap."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            p = store.placement()
            if p is not None:
                return p
        except Exception as e:  # noqa: BLE001 - Redis down: ask the controller instead
            last = e
            try:
                import ray

                from cluster.elastic.controller import get_controller

                d = ray.get(get_controller(namespace).placement.remote(), timeout=10)
                if d:
                    return Placement.from_dict(d)
            except Exception as e2:  # noqa: BLE001
                last = e2
        time.sleep(0.2)
    raise RuntimeError(f"no placement available after {timeout_s}s (is the controller bootstrapped?): {last}")


class ElasticReplica:
    def __init__(self, config: MogeConfig, replica_id: str, store: ElasticStore, fleet: WorkerFleet,
                 experts: Dispatcher, local: Any = None) -> None:
        self.config = config
        self.replica_id = replica_id
        self.store = store
        self.fleet = fleet
        self.experts = experts
        self.local = local  # ReplicaGroups (elastic.local_groups): groups held in this process
        self.listener: EpochListener | None = None
        self.reporter: ReplicaReporter | None = None

    @classmethod
    def connect(cls, config: MogeConfig, replica_id: str | None = None, namespace: str | None = WORKER_NAMESPACE,
                start_timeout_s: float = 120.0, plan: ReplicaPlan | None = None) -> "ElasticReplica":
        el = config.elastic
        rid = replica_id or replica_id_from_serve()
        store = ElasticStore(connect(el.redis_url, el.redis_password, socket_timeout_s=2.0), el.key_prefix)
        try:
            store.ack_epoch(rid, -1)  # be waited for before we even know the placement
        except Exception as e:  # noqa: BLE001 - Redis down: serving still starts (invariant 5)
            log.warning("could not register replica %s in Redis: %s", rid, e)
        placement = _placement_at_start(store, namespace, start_timeout_s)
        fleet = WorkerFleet(config, namespace)
        refs = {w: fleet.ref(w) for w in placement.workers if w != LOCAL}
        cfg = model_config_of(model_spec(config))
        local = ReplicaGroups(config, cfg, store, fleet, rid) if el.local_groups else None
        holder = local.start(placement) if local is not None else None
        experts = build_dispatcher(config, cfg, placement, refs, ReplicaWorkers(config, fleet).replace, rid,
                                   local=holder, plan=plan)
        return cls(config, rid, store, fleet, experts, local)

    def _prepare(self, placement: Placement) -> None:
        """Listener thread: connect to workers this replica has not seen, then stage."""
        known = set(self.experts.placement.workers)
        new = {w: self.fleet.ref(w) for w in placement.workers if w not in known and w != LOCAL}
        if self.local is not None:
            self.local.prepare(placement, self.experts.placement)
        self.experts.adopt(placement, new)

    def _adopt(self) -> int:
        """Step thread: make what _prepare staged current; the epoch in force is acknowledged."""
        return self.experts.on_step_boundary()

    def attach(self, engine: Any, metrics: Any | None = None) -> "ElasticReplica":
        el = self.config.elastic
        self.listener = EpochListener(self.store, self.replica_id, prepare=self._prepare, adopt=self._adopt,
                                      adopted=self.experts.placement).start()
        engine.on_step_boundary(self.listener.at_step_boundary)
        if metrics is not None:
            self.reporter = ReplicaReporter.tapping(self.store, self.replica_id, metrics, el.metrics_interval_s).start()
            metrics.watch_experts(self.experts, self.reporter.cluster_state)
        return self

    @property
    def epoch(self) -> int:
        return self.experts.epoch

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()
        if self.listener is not None:
            self.listener.leave()
        self.experts.close()
