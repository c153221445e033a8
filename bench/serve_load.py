"""Serving under streaming load vs the engine's own static decode rate, in one run.

    python bench/serve_load.py --model preset:qwen3-30b-a3b --device cuda \\
        --loads 1x32x128,128x32x128,256x1024x256 --out docs/data/h200_serve_load.jsonl
    python bench/serve_load.py --model preset:tiny-moge --device cpu --loads 2x16x8 --duration-s 6   # smoke

A load is CONCURRENCYxPROMPTxOUTPUT[:SECONDS] (SECONDS: its own --duration-s). For every load, first the engine API in this process (CUDA
graphs as configured, prefix caching off): CONCURRENCY distinct random prompts of PROMPT tokens,
prefilled, then OUTPUT tokens each decoded as one static batch; the static rate is the tokens of
the decode phase over its time (the context grows from PROMPT to PROMPT + OUTPUT, as a served
stream's does). At concurrency 1 the graph replay of that decode step alone is timed too (the
per-token overhead reference). The engine is then freed and the real server started the way users
start it, `python -m cluster.cli.main serve --config <yaml>` (Ray Serve, HTTP, the same engine
settings, prefix caching off), and CONCURRENCY closed-loop clients stream `/v1/completions`
(`return_token_ids`, `ignore_eos`, a fresh random prompt per request) for --duration-s seconds.

Measured from the clients: TTFT (request sent -> first token), ITL (gaps between token-carrying
chunks), output tokens/s over the window. The clients join evenly over the first --warmup-s seconds
(all at once, they would keep arriving in lock-step waves); requests sent then are reported apart
(ramp_*), the rest is the steady state. One JSON line per load is printed and appended to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_loads(text: str) -> tuple[list[tuple[int, int, int]], dict]:
    """'256x1024x256:40,1x32x128' -> the loads and {load: its own duration in seconds}."""
    loads, durations = [], {}
    for item in text.split(","):
        shape, _, seconds = item.partition(":")
        load = tuple(int(x) for x in shape.lower().split("x"))
        loads.append(load)
        if seconds:
            durations[load] = float(seconds)
    return loads, durations


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def rnd(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# ---- the engine's static rate -------------------------------------------------------------------


def static_rates(args, loads) -> dict[tuple[int, int, int], dict]:
    """Engine API, one engine for every load: decode tok/s of CONCURRENCY sequences from PROMPT to
    PROMPT + OUTPUT tokens of context."""
    import torch

    from actors.device import synchronize
    from actors.engine.build import EngineSettings, LoadSpec, build_engine
    from actors.engine.sampling_params import SamplingParams

    engine, loaded = build_engine(
        LoadSpec(args.model, args.dtype, args.device, max_model_len=args.max_model_len),
        EngineSettings(**engine_settings(args, loads)),
    )
    device = engine.runner.device
    rng = random.Random(1)
    out = {}
    for c, p, o in loads:
        params = SamplingParams(temperature=0, max_tokens=o, ignore_eos=True)
        for i in range(c):
            engine.add_request(f"s{c}-{p}-{o}-{i}", [rng.randrange(256) for _ in range(p)], params)
        while engine.stats().tokens_generated < c:  # prefill: every sequence has its first token
            engine.step()
        synchronize(device)
        t0, g0, s0 = time.perf_counter(), engine.stats().tokens_generated, engine.stats().steps
        while engine.has_unfinished():
            engine.step()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        st = engine.stats()
        row = {"engine_static_tok_per_s": round((st.tokens_generated - g0) / elapsed, 1),
               "engine_static_step_ms": round(1000 * elapsed / max(1, st.steps - s0), 3)}
        graphs = engine.runner.graphs
        if c == 1 and graphs is not None and 1 in graphs.graphs:
            row["graph_replay_ms"] = round(graphs.time_replay(1, 50), 3)
        out[(c, p, o)] = row
        print(json.dumps({"static": [c, p, o], **row}), flush=True)
    del engine, loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def static_in_child() -> dict[tuple[int, int, int], dict]:
    """static_rates in a child process (the server then gets the whole device)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "static.json"
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--static-only", str(path)], check=True, cwd=REPO)
        return {tuple(k): v for k, v in json.loads(path.read_text())}


def engine_settings(args, loads) -> dict:
    return dict(max_num_seqs=max(c for c, _, _ in loads), max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=False, gpu_memory_utilization=args.gpu_memory_utilization)


# ---- the server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, loads, workdir: Path) -> tuple[subprocess.Popen, str]:
    import yaml

    port = free_port()
    settings = engine_settings(args, loads)
    config = {
        "model": {"source": args.model, "device": args.device, "dtype": args.dtype,
                  **({"max_model_len": args.max_model_len} if args.max_model_len else {})},
        "engine": settings,
        "server": {"host": "127.0.0.1", "port": port, "replica_num_gpus": 1 if args.device == "cuda" else 0,
                   "request_timeout_s": 3600, "max_tokens_default": 16},
    }
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(workdir / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli.main", "serve", "--config", str(path)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout_s
    import httpx

    while time.monotonic() < deadline:  # bounded poll until the app answers
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {workdir / 'serve.log'}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"the server did not answer /health in {args.start_timeout_s} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # `moge serve` shuts Serve and Ray down on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# ---- the clients ---------------------------------------------------------------------------------


async def run_load(url: str, model: str, c: int, p: int, o: int, duration_s: float, warmup_s: float,
                   seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    started = time.perf_counter()
    end = started + duration_s
    requests: list[dict] = []
    events: list[tuple[float, int]] = []  # (arrival, tokens) of every token-carrying chunk
    errors: list[str] = []

    async def one(client) -> None:
        body = {"model": model, "prompt": [rng.randrange(256) for _ in range(p)], "max_tokens": o,
                "stream": True, "ignore_eos": True, "return_token_ids": True, "temperature": 0}
        sent = time.perf_counter()
        times, counts = [], []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                choice = json.loads(data)["choices"][0]
                n = len(choice.get("token_ids") or [])
                if n:
                    now = time.perf_counter()
                    times.append(now)
                    counts.append(n)
                    events.append((now, n))
        requests.append({"sent": sent, "times": times, "tokens": sum(counts)})

    async def client_loop(client, delay: float) -> None:
        await asyncio.sleep(delay)  # clients join evenly over the warm-up: no lock-step waves of arrivals
        while time.perf_counter() < end:
            try:
                await one(client)
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600, connect=30), limits=limits) as client:
        await asyncio.gather(*(client_loop(client, i * warmup_s / c) for i in range(c)))
    finished = time.perf_counter()

    steady = [r for r in requests if r["sent"] >= started + warmup_s and r["times"]]
    ramp = [r for r in requests if r["sent"] < started + warmup_s and r["times"]]

    def ttfts(rs):
        return [1000 * (r["times"][0] - r["sent"]) for r in rs]

    itl = [1000 * (b - a) for r in steady for a, b in zip(r["times"], r["times"][1:])]
    window_start = started + warmup_s
    window_end = min(end, finished)
    tokens = sum(n for t, n in events if window_start <= t <= window_end)
    window = max(1e-9, window_end - window_start)
    e2e = [1000 * (r["times"][-1] - r["sent"]) for r in steady]
    return {
        "concurrency": c, "prompt_tokens": p, "output_tokens": o,
        "out_tok_per_s": round(tokens / window, 1),
        "ttft_p50_ms": rnd(pct(ttfts(steady), 50)), "ttft_p99_ms": rnd(pct(ttfts(steady), 99)),
        "itl_p50_ms": rnd(pct(itl, 50), 3), "itl_p99_ms": rnd(pct(itl, 99), 3),
        "e2e_p50_ms": rnd(pct(e2e, 50)),
        "requests": len(steady), "ramp_requests": len(ramp),
        "ramp_ttft_p50_ms": rnd(pct(ttfts(ramp), 50)), "ramp_ttft_p99_ms": rnd(pct(ttfts(ramp), 99)),
        "window_s": round(window, 2), "warmup_s": warmup_s, "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens_per_chunk": round(sum(n for _, n in events) / max(1, len(events)), 3),
    }


def served_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="preset:tiny-moge")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--loads", default="2x16x8", help="CONCURRENCYxPROMPTxOUTPUT, comma-separated")
    ap.add_argument("--duration-s", type=float, default=30)
    ap.add_argument("--warmup-s", type=float, default=None, help="default: a third of --duration-s")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--no-static", action="store_true", help="skip the engine-API static rates")
    ap.add_argument("--static-only", default="", help=argparse.SUPPRESS)  # the child that measures them
    ap.add_argument("--out", default="")
    ap.add_argument("--logs-out", default="", help="folder for the server's config and log")
    ap.add_argument("--then", default="", help="a command run against the server after the loads ({url} "
                    "replaced), e.g. another load generator; its output goes to <logs-out>/then.log")
    ap.add_argument("--then-timeout-s", type=float, default=120)
    args = ap.parse_args()
    # the in-process engine's start-up lines (KV budget, graphs, step costs): the server's engine,
    # built from the same settings, logs the same inside its replica
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("actors.engine").setLevel(logging.INFO)
    loads, durations = parse_loads(args.loads)
    if args.static_only:  # in a child process, so that every byte of its engine is freed for the server
        rates = static_rates(args, loads)
        Path(args.static_only).write_text(json.dumps([[list(k), v] for k, v in rates.items()]))
        return
    static = {} if args.no_static else static_in_child()
    workdir = Path(args.logs_out or tempfile.mkdtemp(prefix="serve-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args, loads, workdir)
    rows = []
    try:
        model = served_model(url)
        for i, (c, p, o) in enumerate(loads):
            duration = durations.get((c, p, o), args.duration_s)
            warmup = duration / 3 if args.warmup_s is None else args.warmup_s
            row = asyncio.run(run_load(url, model, c, p, o, duration, warmup, seed=100 + i))
            row.update(static.get((c, p, o), {}))
            if row.get("engine_static_tok_per_s"):
                row["served_over_static"] = round(row["out_tok_per_s"] / row["engine_static_tok_per_s"], 3)
            if row.get("graph_replay_ms") and row.get("itl_p50_ms"):
                row["itl_p50_over_replay"] = round(row["itl_p50_ms"] / row["graph_replay_ms"], 3)
            row.update(model=args.model, device=args.device, max_num_batched_tokens=args.max_num_batched_tokens,
                       gpu_memory_utilization=args.gpu_memory_utilization)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if args.then:
            with open(workdir / "then.log", "w") as log:
                try:
                    rc = subprocess.run(args.then.replace("{url}", url), shell=True, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=args.then_timeout_s).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            print(json.dumps({"then": args.then, "rc": rc}), flush=True)
    finally:
        stop_server(proc)
    if any(r["errors"] or not r["requests"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
