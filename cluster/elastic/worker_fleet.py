"""The expert workers as named, detached Ray actors: start one on a device, find it by id, stop it.

Workers are named `moge-expert-<id>` in the cluster's namespace and detached, so they outlive a
controller restart: a restarted controller finds the same workers by name (invariant 5). A worker
is placed by Ray on any node that has the device resource it asks for, which is how "a new device"
reaches the cluster: a node joins with that resource, and the next worker lands there.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from actors.experts.worker.spec import worker_options
from actors.experts.worker.worker import ExpertWorker
from actors.experts.carriers.base import WorkerRef
from cluster.config import MogeConfig

log = logging.getLogger(__name__)

NAME_PREFIX = "moge-expert-"


def actor_name(worker_id: str) -> str:
    return NAME_PREFIX + worker_id


def model_spec(config: MogeConfig) -> dict:
    m = config.model
    device = m.device
    if device_kind(config) != "cpu":
        # a worker on a Ray-granted accelerator sees only that one, as index 0: "cuda:1" (the
        # replica's own device, e.g. bench/scale_latency.py --local) would not exist there
        device = device.split(":")[0]
    return {"source": m.source, "n_groups": m.n_groups, "device": device, "dtype": m.dtype, "seed": m.seed,
            "batch_invariant": config.engine.batch_invariant}


def transport_options(config: MogeConfig) -> dict:
    """The worker's transport options; the cluster secret rides in them through Ray (actor args)."""
    from cluster.security import cluster_secret

    dp = config.data_plane
    return {"max_message_bytes": dp.grpc_max_message_bytes, "tls_cert": dp.grpc_tls_cert,
            "tls_key": dp.grpc_tls_key, "tls_ca": dp.grpc_tls_ca, "host": dp.advertise_host,
            "timeout_s": dp.call_timeout_s, "auth_token": cluster_secret.ensure()}


def device_kind(config: MogeConfig) -> str:
    dp = config.data_plane
    if dp.worker_resources.get("NPU"):
        return "npu"
    if dp.worker_num_gpus > 0:
        return "cuda"
    return "cpu"


class WorkerFleet:
    def __init__(self, config: MogeConfig, namespace: str | None = None) -> None:
        self.config = config
        self.namespace = namespace
        self._actor_cls = ray.remote(ExpertWorker)

    def start(self, worker_id: str, ready_timeout_s: float = 120.0) -> Any:
        """Create the worker (or get the live one of that id) and wait until it answers a ping.
        A live one that serves another model spec or carrier (left by an earlier deployment: workers
        are detached) is stopped and created anew, never used. TimeoutError when Ray cannot place
        it (no free device) within the timeout."""
        dp = self.config.data_plane
        spec = model_spec(self.config)
        opts = worker_options(device_kind(self.config), num_gpus=dp.worker_num_gpus, num_cpus=dp.worker_num_cpus,
                              resources=dp.worker_resources, name=actor_name(worker_id), namespace=self.namespace)
        for attempt in range(2):
            handle = self._actor_cls.options(**opts).remote(worker_id, spec, dp.transport, transport_options(self.config))
            reply = self._ready(worker_id, handle, opts, ready_timeout_s)
            if self._ours(reply):
                return handle
            log.warning("worker %s is alive with another model spec or carrier (%s, %s); replacing it",
                        worker_id, reply.get("spec"), reply.get("transport"))
            self.stop(worker_id, handle)
            self._wait_released(worker_id, ready_timeout_s)
        raise RuntimeError(f"worker {worker_id}: a worker of another model spec keeps the name")

    def serves_this_model(self, worker_id: str, timeout_s: float = 10.0) -> bool:
        """Does the live worker of this id serve this fleet's model spec over its carrier (not a
        detached leftover of another deployment)?"""
        return self._ours(ray.get(self.handle(worker_id).ping.remote(), timeout=timeout_s))

    def _ours(self, ping_reply: dict) -> bool:
        return (ping_reply.get("spec") == model_spec(self.config)
                and ping_reply.get("transport") == self.config.data_plane.transport)

    def _wait_released(self, worker_id: str, timeout_s: float, poll_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while worker_id in self.running() and time.monotonic() < deadline:
            time.sleep(poll_s)

    def _ready(self, worker_id: str, handle: Any, opts: dict, ready_timeout_s: float) -> dict:
        try:
            return ray.get(handle.ping.remote(), timeout=ready_timeout_s)
        except Exception as e:
            self.stop(worker_id, handle)
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise TimeoutError(f"worker {worker_id} not placed within {ready_timeout_s}s: "
                                   f"is there a free device ({opts.get('resources') or 'CPU'})?") from e
            raise

    def handle(self, worker_id: str) -> Any:
        """The live actor of `worker_id`; ValueError if there is none."""
        return ray.get_actor(actor_name(worker_id), namespace=self.namespace)

    def ref(self, worker_id: str, timeout_s: float = 30.0) -> WorkerRef:
        h = self.handle(worker_id)
        return WorkerRef(worker_id, handle=h, endpoint=ray.get(h.endpoint.remote(), timeout=timeout_s))

    def alive(self, worker_id: str, timeout_s: float = 5.0) -> bool:
        try:
            ray.get(self.handle(worker_id).ping.remote(), timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - gone, dead, or not answering: all mean "not alive"
            return False

    def stop(self, worker_id: str, handle: Any = None) -> None:
        try:
            h = handle if handle is not None else self.handle(worker_id)
        except ValueError:
            return  # already gone
        try:
            ray.get(h.shutdown.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - killing it below is what matters
            log.info("worker %s shutdown call failed: %s", worker_id, e)
        ray.kill(h, no_restart=True)

    def running(self) -> list[str]:
        """Ids of the named workers Ray knows in this namespace (alive or restarting)."""
        names = ray.util.list_named_actors(all_namespaces=self.namespace is not None)
        out = []
        for n in names:
            if isinstance(n, dict):
                if self.namespace is not None and n.get("namespace") != self.namespace:
                    continue
                n = n.get("name", "")
            if n.startswith(NAME_PREFIX):
                out.append(n[len(NAME_PREFIX):])
        return sorted(out)
