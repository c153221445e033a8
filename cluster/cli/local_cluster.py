"""A whole serving stack on this machine: a fresh local Ray, the elastic control plane when there
are expert workers, Serve's HTTP proxy, the app, and a wait until /health answers. Used by
`moge serve` and by the integration tests.

Whenever experts run in separate workers (data_plane.transport grpc / collective) the controller
owns them: `start_elastic` brings up Redis (embedded unless elastic.redis_url is set), the
controller and the first workers before the app, and the app receives the config that names that
Redis. There is no second, controller-less way to run workers locally: with the default policy
`none` the elastic cluster is a static one that the admin API can still scale and migrate.
The default in-process model starts none of this.

Ray gets a bounded number of logical CPUs (what the replicas and expert workers ask for, not the
machine's core count) and no dashboard: both keep start-up short on a small machine.

Hermetic and private (docs/reliability.md): `start_ray` always starts a new local instance
(address="local": never joins another Ray found through RAY_ADDRESS or /tmp/ray), in its own temp
dir, with token authentication on and its own token (a 0600 file in that dir, not the user's shared
~/.ray/auth_token), and with the node IP 127.0.0.1 so that GCS, raylet, object manager, workers,
the dashboard agent and its metrics exporter bind to loopback. One port Ray does not let us bind:
each Serve replica's inter-deployment gRPC server listens on [::]:0 (hard-coded in Ray Serve).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

from cluster.config import MogeConfig

APP_NAME = "moge"
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def logical_cpus(config: MogeConfig) -> int:
    """CPUs Ray must advertise so every replica and expert worker can be placed (elastic: up to
    the policy's max_devices workers)."""
    from cluster.elastic.stack import elastic_enabled

    server, dp = config.server, config.data_plane
    replicas = server.max_replicas if server.num_replicas == "auto" else server.num_replicas
    workers = max(dp.num_workers, config.elastic.policy.max_devices) if elastic_enabled(config) else 0
    need = replicas * server.replica_num_cpus + workers * dp.worker_num_cpus
    return max(1, math.ceil(need))


def private_ray_dir() -> str:
    """A fresh temp dir for one local Ray (short: Ray's Unix socket paths must stay < 108 bytes)
    holding a new auth token file readable only by this user; token auth is switched on for this
    process and everything it starts."""
    root = tempfile.mkdtemp(prefix="moge-ray-", dir="/tmp")
    token = Path(root) / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _refresh_ray_auth()
    return root


def _refresh_ray_auth() -> None:
    """Ray caches its auth mode and token when first imported; make it read the new ones."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # an older Ray without token auth: nothing cached
        pass


def remove_private_ray_dir(root: str | None) -> None:
    if root and Path(root).name.startswith("moge-ray-"):
        shutil.rmtree(root, ignore_errors=True)


def keep_ray_logs(root: str | None) -> str | None:
    """Copy the logs of a private Ray dir (before it is removed) to a new /tmp/moge-logs-* dir:
    what a failed start leaves for the user to read. -> that dir, or None if there were none."""
    if not root:
        return None
    logs = Path(root) / "session_latest" / "logs"
    if not logs.is_dir():
        return None
    dest = tempfile.mkdtemp(prefix="moge-logs-", dir="/tmp")
    shutil.copytree(logs, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock"))
    return dest


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b: .+$")


def first_replica_error(logs_dir: str) -> str | None:
    """The exception a replica died of, from Serve's logs (the last `...Error: message` line that is
    not Ray's own wrapper), so a failed start can say why without the user opening files."""
    found = None
    for log in sorted(Path(logs_dir, "serve").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            line = line.strip()
            if _ERROR_LINE.match(line) and not line.startswith("RuntimeError: Traceback"):
                found = line
    return found


def start_ray(num_cpus: int) -> str:
    """ray.init for this machine: a new, private, loopback-only local instance (see the module
    docstring), bounded logical CPUs, no dashboard, workers that can import this checkout (they are
    separate processes and do not inherit the driver's sys.path). -> its temp dir, for
    remove_private_ray_dir after ray.shutdown()."""
    import ray

    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    root = private_ray_dir()
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            namespace=APP_NAME,
            log_to_driver=False,
            configure_logging=False,
            _temp_dir=root,
            _node_ip_address="127.0.0.1",
        )
    except BaseException:
        remove_private_ray_dir(root)
        raise
    # ray.init installs a native SIGTERM handler that aborts the process; a caller that set its own
    # (the CLI's clean shutdown) gets it back.
    if callable(previous):
        signal.signal(signal.SIGTERM, previous)
    return root


class LocalCluster:
    def __init__(self, config: MogeConfig, app_name: str = APP_NAME, num_cpus: int | None = None,
                 control_plane: bool = True) -> None:
        """`control_plane=False`: do not start the controller here; with elastic.redis_url set the
        replicas start it themselves, as they do when deployed from a Serve config (KubeRay)."""
        self.config = config
        self.app_name = app_name
        self.control_plane = control_plane
        self.num_cpus = num_cpus if num_cpus is not None else logical_cpus(config)
        self.base_url = ""
        self.stack = None  # cluster.elastic.stack.ElasticStack when there are expert workers
        self._owns_ray = False
        self._ray_dir: str | None = None
        self._owns_serve = False
        self._app_running = False

    def start(self, timeout_s: float = 120) -> str:
        """Start Ray (unless this process already has it), the elastic control plane (when there
        are expert workers), Serve and the app; return the base URL once /health answers 200."""
        import ray
        from ray import serve

        from cluster.elastic.stack import elastic_enabled, start_elastic
        from cluster.serve.app import app_builder

        deadline = time.monotonic() + timeout_s
        if not ray.is_initialized():
            self._ray_dir = start_ray(self.num_cpus)
            self._owns_ray = True
        config = self.config
        if elastic_enabled(config) and self.control_plane:
            from cluster.replica.workers import WORKER_NAMESPACE

            self.stack = start_elastic(config, namespace=WORKER_NAMESPACE,
                                       bootstrap_timeout_s=max(1.0, deadline - time.monotonic()))
            config = self.stack.config  # names the (embedded) Redis every replica must reach
        server = config.server
        port, route_prefix = self._start_serve(server.host, server.port)
        serve.run(app_builder({"config": config.model_dump(mode="json")}), name=self.app_name,
                  route_prefix=route_prefix)
        self._app_running = True
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        self.base_url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        wait_until_healthy(self.base_url, deadline)
        return self.base_url

    def _start_serve(self, host: str, port: int) -> tuple[int, str]:
        """-> (port, route prefix). This process's Ray may already run Serve for another app (a
        test session's shared server): then this app joins that proxy under /<app name>."""
        from ray import serve
        from ray.serve.context import _get_global_client

        try:
            running = _get_global_client(raise_if_no_controller_running=False) is not None
        except Exception:  # noqa: BLE001 - no Serve controller in this cluster
            running = False
        self._owns_serve = not running
        if not running:  # a new proxy: its port must be ours alone (cluster/cli/ports.py)
            from cluster.cli.ports import check_free

            check_free(host, port)
        serve.start(http_options={"host": host, "port": port})
        if not running:
            return port, "/"
        return int(_get_global_client().http_config.port), f"/{self.app_name}"

    def stop(self, keep_logs: bool = False) -> str | None:
        """Stop the app (Serve too, if this object started it), then the control plane and its
        workers, then Ray if this object started it. Replicas go first: they leave the ack set.
        `keep_logs`: copy the private Ray dir's logs out before it is removed -> their dir."""
        import ray
        from ray import serve

        kept = None
        if self.stack is not None and self.stack.redis is not None:
            self.stack.redis.stop_supervising()  # stopping: a redis-server that exits now stays down

        try:
            if ray.is_initialized():
                if self._owns_serve:
                    serve.shutdown()
                elif self._app_running:
                    serve.delete(self.app_name)
        finally:
            self._app_running = self._owns_serve = False
            try:
                if self.stack is not None and ray.is_initialized():
                    self.stack.stop()
            finally:
                self.stack = None
                if self._owns_ray:
                    ray.shutdown()
                    self._owns_ray = False
                    if keep_logs:
                        kept = keep_ray_logs(self._ray_dir)
                    remove_private_ray_dir(self._ray_dir)
                    self._ray_dir = None
        return kept

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
