"""`moge status | scale N | migrate GROUP WORKER`: the admin API from a shell.

    moge status                       workers, groups, epoch, per-group load and imbalance
    moge scale 4                      grow or shrink to 4 expert workers (devices), live
    moge migrate 3 w2 [--replicate]   move (or copy) group 3 onto worker w2, live

Talks to a running server's /admin routes: --url (default http://127.0.0.1:8000, or MOGE_URL) and
--admin-key (or MOGE_ADMIN_KEY). A server that is still starting (connection refused, /health not
200 yet) is waited for, up to --wait seconds, so `moge serve ... &` followed by `moge status` works
as typed. `scale` and `migrate` print the operation's phases as the controller journals them (they
poll /admin/status while the operation's own request is open). `add_admin_commands(subparsers)`
plugs these into cluster/cli/main.py; each subcommand sets `func`, which returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Callable

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_WAIT_S = 180.0  # a CPU elastic start takes ~50 s on 2 cores
POLL_S = 0.5

ENV_HELP = """environment:
  MOGE_URL        default for --url (now: {url})
  MOGE_ADMIN_KEY  default for --admin-key ({key})"""


def add_admin_commands(subparsers: Any) -> None:
    url = os.environ.get("MOGE_URL", DEFAULT_URL)
    key = os.environ.get("MOGE_ADMIN_KEY")
    env_help = ENV_HELP.format(url=url, key="set" if key else "unset")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=url, help="server base URL (default: $MOGE_URL or %(default)s)")
        p.add_argument("--admin-key", default=key,
                       help="admin Bearer key, one of the server's --admin-key values (default: $MOGE_ADMIN_KEY)")
        p.add_argument("--json", action="store_true", help="print the raw JSON answer")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default: %(default)s)")
        p.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                       help="wait this long for a server that is still starting; 0 = fail at once (default: %(default)s)")

    def parser(name: str, help_: str, examples: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=help_, description=help_, epilog=f"examples:\n{examples}\n\n{env_help}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    status = parser("status", "placement, workers, epoch, per-group load",
                    "  moge status\n  moge status --url http://10.0.0.5:8000 --admin-key $MOGE_ADMIN_KEY --json")
    common(status)
    status.set_defaults(func=status_command)

    scale = parser("scale", "scale the expert workers to N devices, live",
                   "  moge scale 4        grow to 4 expert workers; groups migrate, no request fails\n"
                   "  moge scale 1        shrink back")
    scale.add_argument("devices", type=int, help="expert workers (devices) wanted")
    common(scale)
    scale.set_defaults(func=scale_command)

    migrate = parser("migrate", "move an expert group to a worker, live",
                     "  moge migrate 3 w1               move group 3 onto worker w1\n"
                     "  moge migrate 3 w1 --replicate   copy it there, keeping its current holders")
    migrate.add_argument("group", type=int, help="expert group id")
    migrate.add_argument("worker", help="worker id, as `moge status` lists them (w0, w1, ...)")
    migrate.add_argument("--replicate", action="store_true", help="keep the current holders too")
    common(migrate)
    migrate.set_defaults(func=migrate_command)


def wait_for_server(url: str, wait_s: float, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep, out=sys.stderr) -> str | None:
    """None once GET /health answers 200; else why not, after `wait_s` (bounded poll)."""
    import httpx

    deadline = clock() + wait_s
    said = False
    last = "no answer"
    while True:
        try:
            r = httpx.get(url.rstrip("/") + "/health", timeout=5)
            if r.status_code == 200:
                return None
            last = f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if clock() >= deadline:
            return last
        if not said:
            print(f"moge: waiting up to {wait_s:.0f}s for {url} to start ({last})", file=out, flush=True)
            said = True
        sleep(min(POLL_S * 2, max(0.0, deadline - clock())))


def _request(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    problem = wait_for_server(args.url, args.wait) if args.wait > 0 else None
    if problem is not None:
        print(f"moge: cannot reach {args.url} after waiting {args.wait:.0f}s: {problem}", file=sys.stderr)
        return 0, None
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as e:
        print(f"moge: cannot reach {args.url}: {e}", file=sys.stderr)
        return 0, None
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"error": {"message": r.text[:500]}}


def _finish(args: argparse.Namespace, code: int, data: Any, render) -> int:
    if data is None:
        return 1
    if code >= 400:
        msg = data.get("error", {}).get("message", data) if isinstance(data, dict) else data
        print(f"moge: HTTP {code}: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=1) if args.json else render(data))
    return 0


def status_command(args: argparse.Namespace) -> int:
    code, data = _request(args, "GET", "/admin/status")
    return _finish(args, code, data, render_status)


def scale_command(args: argparse.Namespace) -> int:
    code, data = _with_phases(args, lambda: _request(args, "POST", "/admin/scale", {"devices": args.devices}))
    return _finish(args, code, data, render_operation)


def migrate_command(args: argparse.Namespace) -> int:
    body = {"group": args.group, "worker": args.worker, "replicate": args.replicate}
    code, data = _with_phases(args, lambda: _request(args, "POST", "/admin/migrate", body))
    return _finish(args, code, data, render_operation)


def _with_phases(args: argparse.Namespace, run: Callable[[], tuple[int, Any]]) -> tuple[int, Any]:
    """Run the operation's request on a thread and, while it is open, print each phase the
    controller journals (GET /admin/status every POLL_S). Quiet with --json."""
    result: list[tuple[int, Any]] = []
    worker = threading.Thread(target=lambda: result.append(run()), daemon=True)
    worker.start()
    seen = follow_phases(lambda: _status_once(args), worker.is_alive, sys.stdout) if not args.json else []
    worker.join()
    code, data = result[0] if result else (0, None)
    if not args.json and isinstance(data, dict):
        print_rest_of_timeline(data, seen, sys.stdout)
    return code, data


def print_rest_of_timeline(result: dict, seen: list[str], out) -> None:
    """The phases too quick to be seen by polling, from the operation's own timeline."""
    t = result.get("timeline") or {}
    t0 = t.get("decision")
    if t0 is None:
        return
    for phase, at in sorted(t.items(), key=lambda kv: kv[1]):
        if phase in ("decision", "worker_ready") or phase in seen:
            continue
        print(f"  {result.get('kind')} {phase}  +{at - t0:.1f}s", file=out, flush=True)


def _status_once(args: argparse.Namespace) -> dict | None:
    import httpx

    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    try:
        r = httpx.get(args.url.rstrip("/") + "/admin/status", headers=headers, timeout=10)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def follow_phases(status: Callable[[], dict | None], running: Callable[[], bool], out,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                  poll_s: float = POLL_S) -> list[str]:
    """Print `  <kind> <phase>  +<s>s` whenever the in-flight operation's phase changes, until
    `running()` is false. -> the phases seen."""
    started = clock()
    seen: list[str] = []
    last: tuple[str, str] | None = None
    while running():
        s = status()
        op = (s or {}).get("operation") or None
        if op:
            now = (str(op.get("op_id", "")), str(op.get("phase")))
            if now != last:
                last = now
                seen.append(now[1])
                print(f"  {op.get('kind')} {now[1]}  +{clock() - started:.1f}s", file=out, flush=True)
        sleep(poll_s)
    return seen


def render_status(s: dict) -> str:
    lines = [f"epoch {s.get('epoch')}  devices {s.get('devices')}  policy {s['policy']['name']} "
             f"[{s['policy']['min_devices']}, {s['policy']['max_devices']}]"]
    lines.append(f"{'worker':<8}{'state':<10}{'util':>6}  groups")
    for wid, w in s.get("workers", {}).items():
        util = w.get("utilisation")
        lines.append(f"{wid:<8}{w['state']:<10}{'-' if util is None else f'{util:.0%}':>6}  {w['groups']}")
    tokens = s.get("group_tokens") or {}
    if tokens:
        lines.append("group tokens: " + ", ".join(f"{g}:{n}" for g, n in sorted(tokens.items(), key=lambda kv: int(kv[0]))))
    if s.get("group_imbalance") is not None:
        lines.append(f"imbalance (max-min)/mean: {s['group_imbalance']:.3f}")
    lines.append(f"replicas: {s.get('replicas')}")
    if s.get("operation"):
        lines.append(f"operation in flight: {s['operation'].get('kind')} {s['operation'].get('phase')}")
    decision = s["policy"].get("last_decision")
    if decision:
        lines.append(f"last decision: {decision['devices']} devices ({decision['reason']})")
    if s.get("last_error"):
        lines.append(f"last error: {s['last_error']}")
    return "\n".join(lines)


def render_operation(r: dict) -> str:
    if r.get("phase") == "noop":
        return f"nothing to do (epoch {r.get('epoch')}, workers {r.get('workers')})"
    t = r.get("timeline") or {}
    took = ""
    if "decision" in t and t:
        took = f" in {max(t.values()) - t['decision']:.2f}s"
    line = f"{r.get('kind')} {r.get('phase')}{took}: epoch {r.get('from_epoch')} -> {r.get('epoch')}, workers {r.get('workers')}"
    if r.get("error"):
        line += f"\n  error: {r['error']}"
    return line
