"""Runs one headless load test against the embedded cluster and leaves its evidence in a folder.

    python -m loadtest.runner --shape step --users 8 --duration 60 --out out/loadtest

1. starts `python -m cluster.cli.main serve --port <free port> --api-key <random>` on 127.0.0.1 (or
   uses --url, which must be a loopback address) and waits, bounded, for /health;
2. polls the device count once a second (loadtest/device_poller.py);
3. runs locust headless in its own process (never in this one: gevent) with the chosen traffic
   shape, bounded by --duration plus a grace period;
4. stops the server, writes `locust_stats*.csv`, `devices.csv`, `summary.md` and `loadtest.png`.

Exit status: 0 when at least one request ran and none failed, 1 otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from loadtest import traffic_curves
from loadtest.device_poller import DevicePoller
from loadtest.summary import read_summary

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
CSV_PREFIX = "locust"


class SetupError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SetupError(f"--url {url}: load tests only target this machine (127.0.0.0/8, ::1, localhost)")


def wait_healthy(url: str, timeout_s: float, server: subprocess.Popen | None, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SetupError(f"the server exited with {server.returncode} before it was healthy:\n{_tail(log)}")
        try:
            resp = httpx.get(f"{url}/health", timeout=2)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise SetupError(f"{url}/health not healthy after {timeout_s:.0f} s ({last}):\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def key_args(api_key: str) -> list[str]:
    """`moge serve` options making `api_key` its API and admin key. "--opt=value": a key that starts
    with "-" (token_urlsafe gives one in 32) would read as an option after a separate "--api-key"."""
    return [f"--api-key={api_key}", f"--admin-key={api_key}"]


def start_server(port: int, out: Path, config: str | None, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli.main", "serve", "--port", str(port), *(["--config", config] if config else []), *extra]
    log = (out / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    # Own session: the server's Ray processes are its children, and stop_server ends them together.
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(server: subprocess.Popen, grace_s: float = 30) -> None:
    if server.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # stragglers of the process group (raylet, workers) once the leader is gone
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_locust(url: str, out: Path, shape: str, users: int, duration_s: float, api_key: str | None) -> int:
    traffic_curves.make_curve(shape, users, duration_s)  # refuse bad arguments here, not in locust
    env = {
        **os.environ,
        "PYTHONPATH": _pythonpath(),
        traffic_curves.ENV_SHAPE: shape,
        traffic_curves.ENV_USERS: str(users),
        traffic_curves.ENV_DURATION: str(duration_s),
    }
    if api_key:
        env["MOGE_LOADTEST_API_KEY"] = api_key
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--host", url,
        "--csv", str(out / CSV_PREFIX),
        "--csv-full-history",
        "--stop-timeout", "30",
        "--only-summary",
        "--loglevel", "WARNING",
    ]
    with (out / "locust.log").open("w") as log:
        # Bounded: the shape ends the run at duration_s; in-flight requests get stop-timeout.
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=duration_s + 120)
    return done.returncode


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="constant", choices=sorted(traffic_curves.CURVES))
    parser.add_argument("--users", type=int, default=4, help="peak simulated users")
    parser.add_argument("--duration", type=float, default=30, help="seconds of traffic")
    parser.add_argument("--out", type=Path, default=Path("out/loadtest"))
    parser.add_argument("--url", help="an already running server on this machine (else one is started)")
    parser.add_argument("--config", help="MogeConfig YAML for the started server")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for `moge serve`")
    parser.add_argument("--server-timeout", type=float, default=300, help="seconds to wait for /health")
    parser.add_argument("--api-key", default=os.environ.get("MOGE_LOADTEST_API_KEY"))
    args = parser.parse_args(argv)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if args.url:
            require_loopback(args.url)
            url = args.url.rstrip("/")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            # A key of our own, as API and admin key (the admin API is off without one): it opens
            # /admin/status (the device count) and exercises the auth path.
            args.api_key = args.api_key or secrets.token_urlsafe(16)
            server = start_server(port, out, args.config, [*args.server_arg, *key_args(args.api_key)])
        wait_healthy(url, args.server_timeout, server, out / "server.log" if server else None)
        poller = DevicePoller(url, api_key=args.api_key)
        poller.start()
        started = time.time()
        try:
            locust_rc = run_locust(url, out, args.shape, args.users, args.duration, args.api_key)
        finally:
            poller.stop()
            poller.write_csv(out / "devices.csv")
    except (SetupError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            stop_server(server)

    stats = out / f"{CSV_PREFIX}_stats.csv"
    if not stats.exists():
        print(f"loadtest: locust wrote no statistics (exit {locust_rc}):\n{_tail(out / 'locust.log')}", file=sys.stderr)
        return 2
    summary = read_summary(stats)
    command = "python -m loadtest.runner " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.api_key:
        command = command.replace(args.api_key, "***")
    (out / "summary.md").write_text(
        f"`{command}`, {args.shape} shape, {args.users} peak users, {args.duration:.0f} s, "
        f"ran {time.time() - started:.0f} s\n\n{summary.markdown()}\n"
    )
    from loadtest.plot import plot_run  # matplotlib only once there is something to draw

    plot_run(out / f"{CSV_PREFIX}_stats_history.csv", out / "devices.csv", out / "loadtest.png",
             f"{args.shape} shape, peak {args.users} users, {args.duration:.0f} s")
    print(summary.markdown())
    ok = summary.request_count > 0 and summary.failure_count == 0 and locust_rc == 0
    if not ok:
        print(f"loadtest: FAILED (locust exit {locust_rc}); see {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
