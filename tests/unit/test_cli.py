"""The CLI's own behaviour, without Ray: --version, help texts that name defaults and variables,
checks that answer before Ray starts, waiting (bounded) for a starting server, the phases of an
operation as they change, weight-loading bars on a terminal only, the logs a failed start keeps,
and scripts that call only files that exist."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from actors.weights.progress import PROGRESS_FILE_ENV, LoadProgress
from cluster.cli import admin
from cluster.cli.local_cluster import REPO_ROOT, first_replica_error, keep_ray_logs
from cluster.cli.main import build_parser, check_port, check_redis, package_version
from cluster.cli.progress import LoadBars
from cluster.config import MogeConfig


def help_of(*argv: str) -> str:
    out = io.StringIO()
    with pytest.raises(SystemExit), _redirect(out):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


class _redirect:
    def __init__(self, out):
        self.out = out

    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, self.out

    def __exit__(self, *exc):
        sys.stdout = self.saved


def test_version_and_help_texts_tell_defaults_variables_and_examples():
    out = io.StringIO()
    with pytest.raises(SystemExit), _redirect(out):
        build_parser().parse_args(["--version"])
    assert out.getvalue().strip() == f"moge-serve {package_version()}" and package_version()[0].isdigit()
    serve = " ".join(help_of("serve").split())
    assert "admin API is off" in serve and "the API keys never open it" in serve
    assert "default: 8000" in serve and "MOGE_<SECTION>__<FIELD>" in serve and "examples:" in serve
    status = " ".join(help_of("status").split())
    assert "$MOGE_URL" in status and "$MOGE_ADMIN_KEY" in status and "http://127.0.0.1:8000" in status
    assert "--wait SECONDS" in status and "default: 180" in status


def test_checks_before_ray_name_a_taken_port_and_a_missing_redis(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert "127.0.0.1:%d" % taken in check_port("127.0.0.1", taken)
    assert check_port("127.0.0.1", taken) is None
    elastic = MogeConfig.load(env={}, data_plane={"transport": "grpc"})
    import cluster.elastic.redis_server as rs

    def missing():
        raise RuntimeError("no redis-server found: install it")

    monkeypatch.setattr(rs, "find_redis_server", missing)
    assert check_redis(elastic) == "no redis-server found: install it"
    assert check_redis(MogeConfig.load(env={})) is None  # in-process experts need no Redis
    external = MogeConfig.load(env={}, data_plane={"transport": "grpc"}, elastic={"redis_url": "redis://r:6379/0"})
    assert check_redis(external) is None


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_admin_commands_wait_for_a_starting_server_within_the_bound(monkeypatch):
    calls = []

    def fake_get(url, timeout):
        calls.append(url)
        if len(calls) < 4:
            raise httpx.ConnectError("Connection refused")
        return httpx.Response(200)

    monkeypatch.setattr(httpx, "get", fake_get)
    clock, err = _Clock(), io.StringIO()
    assert admin.wait_for_server("http://h:1", 30, clock, clock.sleep, err) is None
    assert len(calls) == 4 and err.getvalue().count("waiting up to 30s") == 1

    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(503))
    clock = _Clock()
    assert admin.wait_for_server("http://h:1", 5, clock, clock.sleep, io.StringIO()) == "/health answered 503"
    assert clock.t <= 6


def test_phases_are_printed_as_they_change():
    answers = iter([None, {"operation": None}, {"operation": {"op_id": "a", "kind": "scale", "phase": "loading"}},
                    {"operation": {"op_id": "a", "kind": "scale", "phase": "loading"}},
                    {"operation": {"op_id": "a", "kind": "scale", "phase": "published"}}])
    left = [5]

    def running():
        left[0] -= 1
        return left[0] >= 0

    clock, out = _Clock(), io.StringIO()
    seen = admin.follow_phases(lambda: next(answers), running, out, clock, clock.sleep, poll_s=0.5)
    assert seen == ["loading", "published"]
    assert re.findall(r"scale (\w+)  \+([\d.]+)s", out.getvalue()) == [("loading", "1.0"), ("published", "2.0")]


def test_phases_too_quick_to_poll_come_from_the_operations_timeline():
    out = io.StringIO()
    result = {"kind": "scale", "timeline": {"decision": 10.0, "worker_ready": 12.0, "planned": 12.1, "loading": 12.2,
                                            "publishing": 12.4, "done": 12.5}}
    admin.print_rest_of_timeline(result, ["starting_workers", "loading"], out)
    assert re.findall(r"scale (\w+)  \+([\d.]+)s", out.getvalue()) == [
        ("planned", "2.1"), ("publishing", "2.4"), ("done", "2.5")]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_loading_bars_on_a_terminal_only_from_what_the_loaders_write(monkeypatch):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    with LoadBars(io.StringIO()) as quiet:  # not a terminal: no file, no bar
        assert PROGRESS_FILE_ENV not in os.environ and not quiet.enabled
    term = _Tty()
    with LoadBars(term, poll_s=3600) as bars:
        path = os.environ[PROGRESS_FILE_ENV]
        with LoadProgress(12, "expert groups") as p:  # what a replica or worker process does
            for _ in range(12):
                p.update()
        bars.poll()
    assert PROGRESS_FILE_ENV not in os.environ and not Path(path).exists()
    text = term.getvalue()
    assert "loading expert groups" in text and "12/12" in text


def test_a_failed_start_keeps_the_logs_outside_the_removed_ray_dir(tmp_path):
    root = tmp_path / "moge-ray-x"
    session = root / "session_2026"
    (session / "logs" / "serve").mkdir(parents=True)
    (session / "logs" / "serve" / "replica.log").write_text(
        "INFO starting\nRuntimeError: Traceback (most recent call last):\n"
        "actors.weights.hf_config.UnsupportedModelError: model_type 'llama' is not supported\n")
    (root / "session_latest").symlink_to(session)
    kept = keep_ray_logs(str(root))
    try:
        assert "UnsupportedModelError" in (Path(kept) / "serve" / "replica.log").read_text()
        assert first_replica_error(kept) == (
            "actors.weights.hf_config.UnsupportedModelError: model_type 'llama' is not supported")
        assert keep_ray_logs(str(tmp_path / "nothing")) is None
    finally:
        subprocess.run(["rm", "-rf", kept], check=True)


def test_scripts_call_only_files_that_exist():
    missing = []
    for script in [*sorted((REPO_ROOT / "scripts").glob("*.sh")), REPO_ROOT / ".ci" / "run"]:
        for ref in re.findall(r"(?:bash|source|\.)\s+((?:scripts|helm|bench|tests)/[\w./-]+\.sh)", script.read_text()):
            if not (REPO_ROOT / ref).is_file():
                missing.append(f"{script.name}: {ref}")
    assert not missing, missing
