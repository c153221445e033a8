"""`moge status | scale N | migrate GROUP WORKER`: the admin API from a shell.

    moge status                       workers, groups, epoch, per-group load and imbalance
    moge scale 4                      grow or shrink to 4 expert workers (devices), live
    moge migrate 3 w2 [--replicate]   move (or copy) group 3 onto worker w2, live

Talks to a running server's /admin routes: --url (default http://127.0.0.1:8000, or MOGE_URL) and
--admin-key (or MOGE_ADMIN_KEY). `add_admin_commands(subparsers)` plugs these into cluster/cli/main.py;
each subcommand sets `func`, which returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def add_admin_commands(subparsers: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("MOGE_URL", DEFAULT_URL), help="server base URL")
        p.add_argument("--admin-key", default=os.environ.get("MOGE_ADMIN_KEY"), help="admin Bearer key")
        p.add_argument("--json", action="store_true", help="print the raw JSON answer")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer")

    status = subparsers.add_parser("status", help="placement, workers, epoch, per-group load")
    common(status)
    status.set_defaults(func=status_command)

    scale = subparsers.add_parser("scale", help="scale the expert workers to N devices, live")
    scale.add_argument("devices", type=int)
    common(scale)
    scale.set_defaults(func=scale_command)

    migrate = subparsers.add_parser("migrate", help="move an expert group to a worker, live")
    migrate.add_argument("group", type=int)
    migrate.add_argument("worker")
    migrate.add_argument("--replicate", action="store_true", help="keep the current holders too")
    common(migrate)
    migrate.set_defaults(func=migrate_command)


def _request(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
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
    code, data = _request(args, "POST", "/admin/scale", {"devices": args.devices})
    return _finish(args, code, data, render_operation)


def migrate_command(args: argparse.Namespace) -> int:
    body = {"group": args.group, "worker": args.worker, "replicate": args.replicate}
    code, data = _request(args, "POST", "/admin/migrate", body)
    return _finish(args, code, data, render_operation)


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
