"""`moge serve --model DIR` as a user runs it: a subprocess with its own local Ray, serving a
Hugging Face-format checkpoint (tiny Pangu Pro MoE layout) under the directory's name, ready within
a bound, and gone cleanly after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cluster.local_cluster import REPO_ROOT, free_port
from tests.unit.conftest import PANGU_TINY_CONFIG, pangu_tensors, write_checkpoint

pytestmark = pytest.mark.integration

READY_BOUND_S = 120  # generous for a loaded 2-core CI box; ~20 s measured on an idle one


def read_until(proc: subprocess.Popen, needle: str, deadline: float) -> list[str]:
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"'{needle}' not printed in time; output:\n" + "\n".join(lines))


def test_moge_serve_a_checkpoint_directory_then_sigterm(tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "pangu-tiny", PANGU_TINY_CONFIG, pangu_tensors(PANGU_TINY_CONFIG, seed=3))
    port, key = free_port(), "sk-cli-test"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MOGE_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(ckpt), "--port", str(port),
         "--api-key", key, "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
    )
    try:
        lines = read_until(proc, "Ctrl-C to stop", started + READY_BOUND_S)
        banner = "\n".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in banner and "curl " in banner

        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as client:
            models = client.get("/v1/models").json()
            assert [m["id"] for m in models["data"]] == ["pangu-tiny"]  # named after the directory
            r = client.post("/v1/completions", json={"model": "pangu-tiny", "prompt": [1, 2, 3], "max_tokens": 4,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == 3

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_moge_serve_refuses_a_directory_that_is_not_a_checkpoint(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 2 and "config.json" in proc.stderr
