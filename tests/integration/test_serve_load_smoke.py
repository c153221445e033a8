"""bench/serve_load.py end to end on CPU with the tiny preset: the engine's static rate, then the real
server (`python -m cluster.cli.main serve`, Ray Serve, HTTP on 127.0.0.1) under two streaming
clients; the JSON line has every field docs/performance.md reads, and no request failed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_serve_load_runs_on_cpu_with_the_tiny_preset(tmp_path):
    out = tmp_path / "load.jsonl"
    proc = subprocess.run(
        [sys.executable, "bench/serve_load.py", "--model", "preset:tiny-moge", "--device", "cpu",
         "--loads", "2x12x6:5", "--warmup-s", "1", "--start-timeout-s", "150", "--out", str(out),
         "--logs-out", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + (tmp_path / "logs" / "serve.log").read_text()[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["concurrency"], row["prompt_tokens"], row["output_tokens"]) == (2, 12, 6)
    for key in ("out_tok_per_s", "engine_static_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        assert row[key] is not None and row[key] > 0, key
    assert row["errors"] == 0 and row["requests"] > 0
    assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] and row["itl_p50_ms"] <= row["itl_p99_ms"]
