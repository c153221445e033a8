"""`moge serve`: an OpenAI-compatible endpoint on a local Ray cluster, in one command; `moge
status | scale | migrate` (cluster/cli/admin.py) drive a running elastic server's admin API.

    moge serve                                  tiny-moge preset on CPU, http://127.0.0.1:8000
    moge serve --model /ckpt/Qwen3-30B-A3B --port 9000
    moge serve --config moge.yaml --api-key sk-...
    moge serve --elastic --workers 2 --api-key sk-...    experts on 2 gRPC expert workers under the
                                                         controller, embedded Redis; then:
    moge status --admin-key sk-...   /   moge scale 4 --admin-key sk-...

Precedence: defaults < --config YAML < MOGE_<SECTION>__<FIELD> environment < flags.
Runs until Ctrl-C or SIGTERM, then shuts Serve, the controller, the workers, Redis and Ray down.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.cli.admin import add_admin_commands
from cluster.cli.progress import LoadBars

SERVE_EPILOG = """examples:
  moge serve                                         tiny-moge preset on CPU, http://127.0.0.1:8000
  moge serve --model /ckpt/Qwen3-30B-A3B --port 9000
  moge serve --config moge.yaml --api-key sk-...
  moge serve --elastic --workers 2 --admin-key $MOGE_ADMIN_KEY &
  moge status; moge scale 4                          (they wait for the server to be ready)

environment:
  MOGE_<SECTION>__<FIELD>   any config knob, e.g. MOGE_SERVER__PORT=9000, MOGE_SERVER__API_KEYS='["sk-1"]'
  MOGE_ADMIN_KEY, MOGE_URL  read by `moge status | scale | migrate`, not by `moge serve`
precedence: defaults < --config YAML < MOGE_* environment < flags"""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moge-serve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moge", description="Elastic MoGE serving on Ray")
    parser.add_argument("--version", action="version", version=f"moge-serve {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API",
                           description="Serve a model behind an OpenAI-compatible HTTP API on a local Ray cluster.",
                           epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model", metavar="PATH", help="Hugging Face-format checkpoint directory "
                       "(default: model.source from --config, else the tiny-moge preset)")
    serve.add_argument("--config", metavar="FILE", help="YAML config, every knob (see cluster/config.py)")
    serve.add_argument("--host", help="interface to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default: 8000)")
    serve.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on every route but /health and /ready "
                       "(repeatable; default: none, no auth)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"], help="where the model runs (default: auto)")
    serve.add_argument("--quantization", choices=["auto", "none", "fp8"],
                       help="fp8: block-scaled FP8 weights (bf16 checkpoints and presets quantized at load); "
                       "auto (default): FP8 checkpoints stay FP8 on FP8 GPUs")
    serve.add_argument("--transport", choices=["inprocess", "grpc", "collective"],
                       help="how activations reach the expert workers; grpc / collective run the experts "
                       "in separate workers owned by the elastic controller (default: inprocess)")
    serve.add_argument("--workers", type=int, metavar="N", help="expert workers (devices) at start (default: 1)")
    serve.add_argument("--elastic", action="store_true",
                       help="expert workers under the controller with an embedded Redis, scalable live "
                       "with `moge scale` (implies --transport grpc unless given)")
    serve.add_argument("--batch-invariant", action="store_true", default=None,
                       help="a request's logits bit-identical whatever else is in its batch "
                       "(engine.batch_invariant; costs some speed, docs/performance.md)")
    serve.add_argument("--admin-key", action="append", dest="admin_keys", metavar="KEY",
                       help="Bearer key for /admin and `moge status|scale|migrate` (repeatable; default: "
                       "none, and the admin API is off: the API keys never open it)")
    serve.add_argument("--tool-call-parser", choices=["auto", "hermes", "mistral", "pangu"],
                       help="tool-call format (default: auto, chosen from the checkpoint's family and chat template)")
    serve.set_defaults(func=serve_command)
    add_admin_commands(sub)
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as a nested config dict; only the flags that were given."""
    out: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            out.setdefault(section, {})[key] = value

    if args.model is not None:
        put("model", "source", str(Path(args.model).expanduser().resolve()))
    put("model", "device", args.device)
    put("model", "quantization", args.quantization)
    put("server", "host", args.host)
    put("server", "port", args.port)
    put("server", "api_keys", args.api_keys)
    put("server", "admin_keys", args.admin_keys)
    put("server", "tool_call_parser", getattr(args, "tool_call_parser", None))
    put("data_plane", "transport", args.transport or ("grpc" if args.elastic else None))
    put("data_plane", "num_workers", args.workers)
    put("engine", "batch_invariant", args.batch_invariant)
    return out


def check_topology(args: argparse.Namespace, config: Any) -> str | None:
    """A clear message for flags that contradict each other or the config, before Ray starts."""
    dp, policy = config.data_plane, config.elastic.policy
    if args.elastic and dp.transport == "inprocess":
        return "--elastic needs expert workers: use --transport grpc or collective, not inprocess"
    if args.workers is not None and dp.transport == "inprocess":
        return "--workers needs expert workers: add --elastic (or --transport grpc|collective)"
    if dp.transport != "inprocess" and not policy.min_devices <= dp.num_workers <= policy.max_devices:
        return (f"{dp.num_workers} expert workers is outside elastic.policy [min_devices, max_devices] = "
                f"[{policy.min_devices}, {policy.max_devices}]")
    return None


def check_model_dir(source: str) -> str | None:
    """A clear message for a --model that cannot be a checkpoint, before Ray starts."""
    if source.startswith("preset:"):
        return None
    path = Path(source)
    if not path.is_dir():
        return f"model directory {source} does not exist"
    if not (path / "config.json").is_file():
        return f"{source} has no config.json: not a Hugging Face-format checkpoint directory"
    return None


def check_port(host: str, port: int) -> str | None:
    """A clear message when the HTTP port is already taken (and by what), before Ray starts;
    LocalCluster checks again right before Serve binds it (cluster/cli/ports.py)."""
    from cluster.cli.ports import PortTaken, check_free

    try:
        check_free(host, port)
    except (PortTaken, OSError) as e:
        return f"cannot listen on {host}:{port}: {e}"
    return None


def check_redis(config: Any) -> str | None:
    """The embedded Redis needs a redis-server binary: say so now, not after Ray started."""
    from cluster.elastic.stack import elastic_enabled

    if not elastic_enabled(config) or config.elastic.redis_url:
        return None
    from cluster.elastic.redis_server import find_redis_server

    try:
        find_redis_server()
    except RuntimeError as e:
        return str(e)
    return None


def example_curl(base_url: str, model: str, api_key: str | None) -> str:
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    body = '{"model": "%s", "prompt": "Hello", "max_tokens": 16}' % model
    return f"curl {base_url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


def serve_command(args: argparse.Namespace) -> int:
    from cluster.config import MogeConfig
    from cluster.cli.local_cluster import LocalCluster
    from cluster.cli.ports import PortTaken

    try:
        config = MogeConfig.load(args.config, **overrides_from_args(args))
    except (OSError, ValueError, ValidationError) as e:  # ValidationError: a bad knob value
        print(f"moge: invalid configuration: {e}", file=sys.stderr)
        return 2
    problem = (check_model_dir(config.model.source) or check_topology(args, config) or check_redis(config)
               or check_port(config.server.host, config.server.port))
    if problem:
        print(f"moge: {problem}", file=sys.stderr)
        return 2

    # SIGTERM (Kubernetes, systemd) behaves like Ctrl-C: unwind to the cleanup below, even mid start-up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    cluster = LocalCluster(config)
    print(f"moge: starting {config.model.source} on a local Ray cluster ...", flush=True)
    failed = False
    try:
        with LoadBars(sys.stderr):  # weight-loading bars from the replicas and workers (TTY only)
            base_url = cluster.start()
        model = _served_model(base_url, config)
        elapsed = time.monotonic() - started
        key = config.server.api_keys[0] if config.server.api_keys else None
        print(f"moge: ready in {elapsed:.1f}s, serving '{model}' at {base_url}/v1", flush=True)
        print(f"  try: {example_curl(base_url, model, key)}", flush=True)
        if cluster.stack is not None:
            dp, server = config.data_plane, config.server
            admin = (f"moge status --url {base_url} --admin-key KEY" if server.admin_keys
                     else "disabled (no --admin-key)")
            print(f"  experts: {dp.num_workers} {dp.transport} worker(s) under the elastic controller; "
                  f"admin: {admin}", flush=True)
        print("  Ctrl-C to stop", flush=True)
        while True:  # until SIGINT / SIGTERM raise KeyboardInterrupt here
            time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        print("moge: shutting down", flush=True)
        return 0
    except PortTaken as e:
        print(f"moge: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # start-up failed: say why, leave nothing running but the logs
        failed = True
        print(f"moge: failed to start: {e}", file=sys.stderr)
        return 1
    finally:
        logs = cluster.stop(keep_logs=failed)
        if logs is not None:
            from cluster.cli.local_cluster import first_replica_error

            cause = first_replica_error(logs)
            if cause:
                print(f"  replica error: {cause}", file=sys.stderr)
            print(f"  logs kept in {logs} (replica logs: {logs}/serve/, worker errors: {logs}/worker-*.err)",
                  file=sys.stderr)


def _served_model(base_url: str, config: Any) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {config.server.api_keys[0]}"} if config.server.api_keys else {}
    r = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10)
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))  # every subcommand sets func; argparse rejects unknown ones


if __name__ == "__main__":
    sys.exit(main())
