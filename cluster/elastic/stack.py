"""Bringing the elastic control plane up and down next to a Serve app: Redis (embedded unless
elastic.redis_url is set), the controller actor, and the first expert workers.

    stack = start_elastic(config, namespace="moge")   # after ray.init, before serve.run
    serve.run(app_builder({"config": stack.config.model_dump(mode="json")}))
    ...
    stack.stop()

`stack.config` carries the Redis URL (with the embedded server's generated password) so replicas
and the controller reach the same Redis.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from cluster.config import MogeConfig
from cluster.elastic.redis_server import EmbeddedRedis

log = logging.getLogger(__name__)


@dataclass
class ElasticStack:
    config: MogeConfig
    redis: EmbeddedRedis | None
    controller: Any
    namespace: str | None
    redis_dir: str | None = None  # a private data dir this stack created (removed at stop)

    def stop(self) -> None:
        """Stop the controller and every expert worker, then the embedded Redis."""
        import ray

        from cluster.elastic.worker_fleet import WorkerFleet

        try:
            ray.get(self.controller.shutdown.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            ray.kill(self.controller, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        fleet = WorkerFleet(self.config, self.namespace)
        for wid in fleet.running():
            fleet.stop(wid)
        # ray.kill returns before Ray drops the names: a stack started right after would get the
        # dying controller back (get_if_exists), still on this stack's config and Redis
        _wait_names_released(self.namespace, fleet)
        if self.redis is not None:
            self.redis.stop()
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)


def _wait_names_released(namespace: str | None, fleet: Any, timeout_s: float = 30.0, poll_s: float = 0.1) -> None:
    import time

    import ray

    from cluster.elastic.controller import CONTROLLER_NAME

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=namespace)
        except ValueError:
            if not fleet.running():
                return
        time.sleep(poll_s)
    log.warning("the controller or expert workers of namespace %r still registered %.0f s after stop",
                namespace, timeout_s)


def elastic_enabled(config: MogeConfig) -> bool:
    """Expert workers are separate actors (and so need a controller) unless experts run in-process."""
    return config.data_plane.transport != "inprocess"


def ensure_controller(config: MogeConfig, namespace: str | None = "moge") -> Any:
    """The controller actor, started if nobody has (a replica deployed from a Serve config file,
    as on KubeRay, where no driver ran `start_elastic`), and asked to bootstrap the first workers.
    Does not wait: the replica waits for the placement to appear in Redis. Cheap and idempotent
    when the controller is already up (get_if_exists; bootstrap returns the stored placement)."""
    from cluster.elastic.controller import start_controller

    controller = start_controller(config, namespace)
    controller.bootstrap.remote(config.data_plane.num_workers)
    return controller


def start_elastic(config: MogeConfig, namespace: str | None = "moge", redis_data_dir: str | None = None,
                  bootstrap_timeout_s: float = 300.0) -> ElasticStack:
    import ray

    from cluster.elastic.controller import start_controller
    from cluster.security import cluster_secret

    cluster_secret.ensure()  # created before any worker or replica asks for it
    redis, own_dir = None, None
    if not config.elastic.redis_url:
        if redis_data_dir is None:  # persistence by default: a restarted redis-server keeps the state
            redis_data_dir = own_dir = tempfile.mkdtemp(prefix="moge-redis-")
        redis = EmbeddedRedis(data_dir=redis_data_dir).start().supervise()
        elastic = config.elastic.model_copy(update={"redis_url": redis.url})
        config = config.model_copy(update={"elastic": elastic})
        log.info("embedded redis-server on 127.0.0.1:%d", redis.port)
    controller = start_controller(config, namespace)
    try:
        ray.get(controller.bootstrap.remote(config.data_plane.num_workers), timeout=bootstrap_timeout_s)
    except Exception:
        if redis is not None:
            redis.stop()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        raise
    return ElasticStack(config, redis, controller, namespace, own_dir)
