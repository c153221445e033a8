"""A whole serving stack on this machine: a fresh local Ray, Serve's HTTP proxy, the app, and a
wait until /health answers. Used by `moge serve` and by the integration tests.

Ray gets a bounded number of logical CPUs (what the replicas and expert workers ask for, not the
machine's core count) and no dashboard: both keep start-up short on a small machine.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

from cluster.config import MogeConfig

APP_NAME = "moge"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def logical_cpus(config: MogeConfig) -> int:
    """CPUs Ray must advertise so every replica and expert worker can be placed."""
    server, dp = config.server, config.data_plane
    replicas = server.max_replicas if server.num_replicas == "auto" else server.num_replicas
    need = replicas * server.replica_num_cpus + dp.num_workers * dp.worker_num_cpus
    return max(1, math.ceil(need))


def start_ray(num_cpus: int) -> None:
    """ray.init for this machine: bounded logical CPUs, no dashboard, workers that can import
    this checkout (they are separate processes and do not inherit the driver's sys.path)."""
    import ray

    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace=APP_NAME,
        log_to_driver=False,
        configure_logging=False,
    )
    # ray.init installs a native SIGTERM handler that aborts the process; a caller that set its own
    # (the CLI's clean shutdown) gets it back.
    if callable(previous):
        signal.signal(signal.SIGTERM, previous)


class LocalCluster:
    def __init__(self, config: MogeConfig, app_name: str = APP_NAME, num_cpus: int | None = None) -> None:
        self.config = config
        self.app_name = app_name
        self.num_cpus = num_cpus if num_cpus is not None else logical_cpus(config)
        self.base_url = ""
        self._owns_ray = False
        self._serve_started = False

    def start(self, timeout_s: float = 120) -> str:
        """Start Ray (unless this process already has it), Serve and the app; return the base URL
        once /health answers 200."""
        import ray
        from ray import serve

        from cluster.serve_app import app_builder

        deadline = time.monotonic() + timeout_s
        if not ray.is_initialized():
            start_ray(self.num_cpus)
            self._owns_ray = True
        server = self.config.server
        serve.start(http_options={"host": server.host, "port": server.port})
        self._serve_started = True
        serve.run(app_builder({"config": self.config.model_dump(mode="json")}), name=self.app_name, route_prefix="/")
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        self.base_url = f"http://{host}:{server.port}"
        wait_until_healthy(self.base_url, deadline)
        return self.base_url

    def stop(self) -> None:
        """Shut Serve down, and Ray too if this object started it."""
        import ray
        from ray import serve

        try:
            if self._serve_started and ray.is_initialized():
                serve.shutdown()
        finally:
            self._serve_started = False
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_healthy(
    base_url: str, deadline: float, clock: Callable[[], float] = time.monotonic, interval_s: float = 0.2
) -> None:
    """Poll /health until it answers 200; raise TimeoutError at `deadline` (a `clock` time)."""
    last = "no answer"
    with httpx.Client(timeout=5) as client:
        while clock() < deadline:
            try:
                r = client.get(f"{base_url}/health")
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
            time.sleep(interval_s)  # a poll interval, not a wait for luck: bounded by the deadline
    raise TimeoutError(f"{base_url}/health did not answer 200 in time (last: {last})")
