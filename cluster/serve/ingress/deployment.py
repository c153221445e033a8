"""The ingress's app as its Serve replica runs it: the HTTP app over a ServeBackend, the admin
routes when the cluster is elastic, the guard's limits from the configuration; its replica watch
probes the attention replicas once a second."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cluster.config import MogeConfig
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.middleware.request_guard import GuardLimits
from cluster.replica.plan import plan_of


def ingress_app(config: MogeConfig, backend: Any) -> FastAPI:
    admin = None
    if plan_of(config).mode == "elastic":
        from cluster.elastic.controller import get_controller
        from cluster.serve.admin_api import admin_keys, admin_router
        from cluster.replica.workers import WORKER_NAMESPACE

        admin = admin_router(lambda: get_controller(WORKER_NAMESPACE), admin_keys(config.server))
    metrics = ReplicaMetrics(config.model.name or "model", part="http")
    limits = GuardLimits.from_settings(config.server, config.engine.max_num_seqs)
    # the replica watch starts with the first request or probe (Front.generate, /health)
    return build_http_app(backend, admin=admin, limits=limits, metrics=metrics, settings=config.server,
                          ready=lambda: backend.call("ready"))
