"""The attention replica as a Ray Serve deployment with the OpenAI routes as its HTTP ingress.

`app_builder({"config": <MogeConfig dict>})` is the Serve application builder, usable from Python
(`serve.run(app_builder(...))`) and from a Serve config file (`import_path:
cluster.serve.app:app_builder`). Each replica builds its engine once, in `start_engine`, the single
place that decides how the model is put together (cluster/replica/assemble.py), then serves HTTP through
cluster/serve/openai_server.py, plus the admin routes (cluster/serve/admin_api.py) when it is elastic.

The config is read with `MogeConfig.load` both in the builder (to size the deployment) and again in
each replica, so MOGE_* variables of the replica's own environment (Kubernetes Secrets: API keys,
the Redis password) apply there and never travel inside the Serve deployment arguments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import MogeConfig, ServerSection
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.openai_server import OpenAIServer, ServedModel, build_http_app
from cluster.replica.assemble import ReplicaParts, assemble

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "AttentionReplica"


@dataclass
class ReplicaEngine:
    """The running engine, what it serves, and the parts assembled for it."""

    engine: Any  # actors.engine.async_engine.AsyncEngine
    served: ServedModel
    parts: ReplicaParts

    @property
    def mode(self) -> str:
        return self.parts.mode

    @property
    def elastic(self):
        return self.parts.elastic

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.parts.close()


def start_engine(config: MogeConfig) -> ReplicaEngine:
    """Assemble this replica's engine (cluster/replica/assemble.py) and start its step thread."""
    from actors.engine.async_engine import AsyncEngine

    parts = assemble(config)
    served = ServedModel(name=parts.loaded.name, tokenizer=parts.loaded.tokenizer,
                         max_model_len=parts.engine.spec.max_model_len, family=parts.loaded.cfg.family)
    return ReplicaEngine(AsyncEngine(parts.engine), served, parts)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class AttentionReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = MogeConfig.load(**config)
        self.replica = start_engine(self.config)
        self.engine, self.served = self.replica.engine, self.replica.served
        self.metrics = ReplicaMetrics(self.served.name, self.engine.stats, self.served.max_model_len)
        if self.replica.elastic is not None:
            self.replica.elastic.attach(self.engine, self.metrics)
        elif self.replica.parts.experts is not None:
            self.metrics.watch_experts(self.replica.parts.experts)
        self.front = OpenAIServer(self.engine, self.served, self.config.server, self.metrics)
        log.info("attention replica serving %s (context %d, experts %s)", self.served.name,
                 self.served.max_model_len, self.replica.parts.plan.describe())

    def __serve_build_asgi_app__(self):  # Serve calls this once, after __init__
        from cluster.serve.middleware.request_guard import GuardLimits

        limits = GuardLimits.from_settings(self.config.server, self.config.engine.max_num_seqs)
        return build_http_app(self.front, health=self._healthy, admin=self._admin_routes(), ready=self._ready,
                              limits=limits)

    async def _ready(self) -> dict:
        """Degraded while an expert group has no live holder (its calls wait for a failover)."""
        experts = self.replica.parts.experts
        if experts is None:
            return {"ready": True}
        unserved = experts.groups_without_live_holder()
        return {"ready": not unserved, "groups_without_live_holder": unserved, "epoch": experts.epoch}

    def _admin_routes(self):
        """/admin/status|scale|migrate, forwarded to the controller; only elastic replicas have one."""
        if self.replica.mode != "elastic":
            return None
        from cluster.serve.admin_api import admin_keys, admin_router
        from cluster.elastic.controller import get_controller
        from cluster.replica.workers import WORKER_NAMESPACE

        return admin_router(lambda: get_controller(WORKER_NAMESPACE), admin_keys(self.config.server))

    async def _healthy(self) -> bool:
        return self.engine.is_alive()

    async def check_health(self) -> None:
        """Serve's periodic probe: a dead step thread makes Serve replace this replica."""
        if not await self._healthy():
            raise RuntimeError("the engine step thread is not running")

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


def deployment_options(config: MogeConfig) -> dict[str, Any]:
    """Serve options of the replica deployment from the server section (replicas, resources)."""
    server: ServerSection = config.server
    # Serve's default (5 in flight per replica) would starve a batch of max_num_seqs. The replica
    # admits max_num_seqs + max_waiting_requests generation requests itself (429 beyond:
    # cluster/serve/middleware/request_guard.py); Serve gets extra_ongoing_requests more slots on top, so
    # /health, /metrics and clients still sending their body never queue in the proxy behind them.
    admitted = config.engine.max_num_seqs + server.max_waiting_requests
    max_ongoing = max(admitted + server.extra_ongoing_requests, math.ceil(2 * server.target_ongoing_requests))
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": server.replica_num_cpus, "num_gpus": server.replica_num_gpus},
        "max_ongoing_requests": max_ongoing,
        "health_check_period_s": 10,
    }
    if server.num_replicas == "auto":
        opts["autoscaling_config"] = {
            "min_replicas": server.min_replicas,
            "max_replicas": server.max_replicas,
            "initial_replicas": server.min_replicas,
            "target_ongoing_requests": server.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = server.num_replicas
    return opts


def app_builder(args: dict[str, Any]) -> Application:
    raw = dict(args.get("config") or {})
    config = MogeConfig.load(**raw)  # validates early and sizes the deployment with env applied
    return AttentionReplica.options(**deployment_options(config)).bind(raw)
