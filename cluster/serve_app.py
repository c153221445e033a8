"""The attention replica as a Ray Serve deployment with the OpenAI routes as its HTTP ingress.

`app_builder({"config": <MogeConfig dict>})` is the Serve application builder, usable from Python
(`serve.run(app_builder(...))`) and from a Serve config file (`import_path:
cluster.serve_app:app_builder`). Each replica builds its engine once, in `start_engine`, the single
place that decides how the model is put together (in-process experts today; remote expert workers
once the data plane plugs in), then serves HTTP through cluster/openai_server.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import MogeConfig, ServerSection
from cluster.metrics import ReplicaMetrics
from cluster.openai_server import OpenAIServer, ServedModel, build_http_app

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "AttentionReplica"


def start_engine(config: MogeConfig) -> tuple[Any, ServedModel]:
    """Build this replica's engine and start its step thread -> (AsyncEngine, what it serves)."""
    from actors.async_engine import AsyncEngine
    from actors.engine_factory import build_engine

    engine, loaded = build_engine(config)
    served = ServedModel(name=loaded.name, tokenizer=loaded.tokenizer, max_model_len=engine.spec.max_model_len)
    return AsyncEngine(engine), served


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class AttentionReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = MogeConfig.model_validate(config)
        self.engine, self.served = start_engine(self.config)
        self.metrics = ReplicaMetrics(self.served.name, self.engine.stats)
        self.front = OpenAIServer(self.engine, self.served, self.config.server, self.metrics)
        log.info("attention replica serving %s (context %d)", self.served.name, self.served.max_model_len)

    def __serve_build_asgi_app__(self):  # Serve calls this once, after __init__
        return build_http_app(self.front, health=self._healthy)

    async def _healthy(self) -> bool:
        alive = getattr(self.engine, "is_alive", None)
        if alive is None:
            return True
        return bool(alive() if callable(alive) else alive)

    async def check_health(self) -> None:
        """Serve's periodic probe: a dead step thread makes Serve replace this replica."""
        if not await self._healthy():
            raise RuntimeError("the engine step thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def deployment_options(config: MogeConfig) -> dict[str, Any]:
    """Serve options of the replica deployment from the server section (replicas, resources)."""
    server: ServerSection = config.server
    # Serve's default (5 in flight per replica) would starve a batch of max_num_seqs; allow the
    # batch plus as much again queued in the engine, and at least twice the autoscaling target.
    max_ongoing = max(2 * config.engine.max_num_seqs, math.ceil(2 * server.target_ongoing_requests))
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
    config = MogeConfig.model_validate(args.get("config") or {})
    payload = config.model_dump(mode="json")
    return AttentionReplica.options(**deployment_options(config)).bind(payload)

