"""`moge serve` as a user runs it: a subprocess with its own local Ray. With `--model DIR` it serves
a Hugging Face-format checkpoint (tiny Pangu Pro MoE layout) under the directory's name, ready
within a bound, and gone cleanly after SIGTERM — with `--batch-invariant`, where 32 concurrent
requests get the log-probabilities each gets alone, to the bit; with `--elastic --workers 2` the
experts run on two gRPC expert workers under the controller: `moge status`, typed while the server
still starts, waits for it and reports them, `moge scale 3` prints its phases as they happen, and
Ctrl-C (SIGINT to the terminal's process group) stops everything: no process of the run is left and
redis-server is not restarted."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from actors.model.reference import greedy_reference
from cluster.cli.local_cluster import REPO_ROOT, free_port
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


def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MOGE_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process below pid."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            out[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        todo += children.get(p, [])
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def redis_servers(port: str) -> list[int]:
    """Live redis-server processes on this port (it rewrites its title to `redis-server host:port`)."""
    found = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "redis-server" in text and (f":{port}" in text or f"--port {port}" in text) and alive(int(cmd.parent.name)):
            found.append(int(cmd.parent.name))
    return found


def moge(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cluster.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=user_env(), cwd=REPO_ROOT, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_moge_serve_a_checkpoint_directory_then_sigterm(tmp_path: Path):
    ckpt = write_checkpoint(tmp_path / "pangu-tiny", PANGU_TINY_CONFIG, pangu_tensors(PANGU_TINY_CONFIG, seed=3))
    port, key = free_port(), "sk-cli-test"
    started = time.monotonic()
    proc = moge("serve", "--model", str(ckpt), "--port", str(port), "--api-key", key, "--device", "cpu",
                "--batch-invariant")
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
            check_batch_invariance(client, "pangu-tiny", vocab=PANGU_TINY_CONFIG["vocab_size"])

        stop(proc)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def check_batch_invariance(client: httpx.Client, model: str, vocab: int, concurrent: int = 32) -> None:
    """Three prompts (5, 17 and 40 tokens) alone, then among 29 other requests of random lengths,
    all 32 at once: every log-probability (chosen and top-3) the same float."""
    rng = random.Random(5)

    def logprobs(prompt: list[int], n: int) -> list:
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0, "logprobs": 3})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        return [lp["token_logprobs"], lp["top_logprobs"]]

    targets = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 17, 40)]
    alone = [logprobs(t, 6) for t in targets]
    others = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 60))] for _ in range(concurrent - len(targets))]
    with ThreadPoolExecutor(concurrent) as pool:
        crowd = list(pool.map(lambda job: logprobs(*job), [(t, 6) for t in targets] + [(o, 8) for o in others]))
    same = [crowd[i] == alone[i] for i in range(len(targets))]
    assert all(same), f"{sum(same)} of {len(targets)} requests kept their log-probabilities among {concurrent}"


def test_moge_serve_elastic_status_while_starting_scale_with_phases_then_ctrl_c(reference_model):
    port, key, admin_key = free_port(), "sk-cli-elastic", "sk-cli-admin"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # its own session: SIGINT to its process group is what a terminal's Ctrl-C sends
    proc = moge("serve", "--transport", "grpc", "--workers", "2", "--elastic", "--port", str(port),
                "--api-key", key, "--admin-key", admin_key, "--device", "cpu", start_new_session=True)
    try:
        status = subprocess.run(  # typed right after `moge serve ... &`: waits for the server
            [sys.executable, "-m", "cluster.cli.main", "status", "--url", url, "--wait", str(READY_BOUND_S)],
            capture_output=True, text=True, timeout=READY_BOUND_S + 60, cwd=REPO_ROOT,
            env={**user_env(), "MOGE_ADMIN_KEY": admin_key})
        assert status.returncode == 0, status.stderr
        assert "waiting up to" in status.stderr
        assert "devices 2" in status.stdout.splitlines()[0]
        assert {"w0", "w1"} <= {line.split()[0] for line in status.stdout.splitlines()[2:4]}
        banner = "\n".join(read_until(proc, "Ctrl-C to stop", started + READY_BOUND_S))
        assert "2 grpc worker(s) under the elastic controller" in banner

        prompt = "two expert workers"
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
            r = client.post("/v1/completions", json={"model": "tiny-moge", "prompt": prompt, "max_tokens": 8,
                                                      "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        ids = reference_model.tokenizer.encode(prompt)
        assert r.json()["choices"][0]["token_ids"] == greedy_reference(reference_model, ids, 8)

        scale = subprocess.run([sys.executable, "-m", "cluster.cli.main", "scale", "3", "--url", url,
                                "--admin-key", admin_key], capture_output=True, text=True, timeout=300,
                               env=user_env(), cwd=REPO_ROOT)
        assert scale.returncode == 0, scale.stderr
        phases = re.findall(r"^  scale (\w+)  \+[\d.]+s$", scale.stdout, re.MULTILINE)
        assert "starting_workers" in phases, scale.stdout  # seen while the new worker starts
        assert {"planned", "loading", "publishing", "published", "dropping", "done"} <= set(phases), scale.stdout
        assert "scale done" in scale.stdout.splitlines()[-1] and "workers" in scale.stdout.splitlines()[-1]

        tree = descendants(proc.pid)
        redis = [pid for pid, cmd in tree.items() if "redis-server" in cmd]
        assert len(redis) == 1
        redis_port = re.search(r"(?:--port |:)(\d+)", tree[redis[0]]).group(1)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(alive(p) for p in tree) or redis_servers(redis_port)):
            time.sleep(0.2)
        assert not [tree[p] for p in tree if alive(p)]
        assert redis_servers(redis_port) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_moge_serve_refuses_a_directory_that_is_not_a_checkpoint(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli.main", "serve", "--model", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 2 and "config.json" in proc.stderr
