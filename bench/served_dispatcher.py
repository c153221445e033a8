"""Served throughput of one elastic replica over each gRPC carrier: the replica assembled as
`moge serve --elastic --workers 2` assembles one (cluster/replica/), its AsyncEngine driven by
--streams concurrent greedy streams (no HTTP hop), the expert workers Ray actors on fractional
GPUs of the same device, the controller and redis-server running.

    PYTHONPATH=. python bench/served_dispatcher.py --preset bench-moge --workers 2 --worker-gpus 0.25 \\
        --streams 8 --seconds 20 --modes off,stream,stream+pp --out served.json

Modes: `off` = the per-call carrier (one unary Compute per layer and worker), `stream` = the
per-step gRPC stream (one bidirectional stream per worker), `+pp` = with ping-pong. Per mode:
tokens/s over --seconds after a warm-up, the median inter-token latency, and whether every request's tokens equal
the first mode's (greedy; the combine is bit-identical across carriers). Every stage has a
deadline (--deadline-s for the whole run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [f"request {i}: the expert groups of a mixture" for i in range(16)]


class Streams:
    """`n` greedy streams in a loop on their own event loop: tokens, timestamps, failures."""

    def __init__(self, engine, tokenizer, n: int, max_tokens: int) -> None:
        self.engine, self.tok, self.n, self.max_tokens = engine, tokenizer, n, max_tokens
        self.events: list[tuple[float, int]] = []
        self.gaps: list[tuple[float, float]] = []  # (when, seconds since the same stream's previous output)
        self.results: dict[str, list[int]] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _one(self, slot: int) -> None:
        from actors.engine.sampling_params import SamplingParams

        k = 0
        while not self._stop.is_set():
            prompt = PROMPTS[(slot + k * self.n) % len(PROMPTS)]
            k += 1
            ids: list[int] = []
            last = None
            try:
                async for out in self.engine.generate(f"{slot}-{k}-{uuid.uuid4().hex[:4]}", self.tok.encode(prompt),
                                                      SamplingParams(temperature=0, max_tokens=self.max_tokens,
                                                                     ignore_eos=True)):
                    now = time.monotonic()
                    ids.extend(out.new_token_ids)
                    self.events.append((now, len(out.new_token_ids)))
                    if last is not None:
                        self.gaps.append((now, now - last))
                    last = now
                self.results.setdefault(prompt, ids)
                if self.results[prompt] != ids:
                    self.failures.append(f"{prompt!r}: tokens changed between two runs of one mode")
            except Exception as exc:  # noqa: BLE001 - counted
                self.failures.append(f"{type(exc).__name__}: {exc}")

    async def _main(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.n)))

    def start(self) -> "Streams":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def tokens_between(self, a: float, b: float) -> int:
        return sum(n for t, n in self.events if a <= t < b)


def with_data_plane(config, **changes):
    from cluster.config import MogeConfig

    return MogeConfig.model_validate({**config.model_dump(), "data_plane": {**config.data_plane.model_dump(), **changes}})


def run_mode(stack, mode: str, args) -> dict:
    from actors.engine.async_engine import AsyncEngine
    from cluster.replica.assemble import build_engine
    from cluster.replica.elastic_side import ElasticReplica
    from cluster.replica.plan import plan_of

    per_step, _, pp = mode.partition("+")
    config = with_data_plane(stack.config, per_step=per_step, ping_pong=pp == "pp")
    plan = plan_of(config)
    er = ElasticReplica.connect(config, f"bench-{mode}-{uuid.uuid4().hex[:4]}", namespace=stack.namespace, plan=plan)
    engine, loaded = build_engine(config, er.experts, plan)
    aengine = AsyncEngine(engine)
    er.attach(aengine)
    streams = Streams(aengine, loaded.tokenizer, args.streams, args.max_tokens).start()
    try:
        time.sleep(args.warmup_s)  # a measured window, not a wait for an event
        t0 = time.monotonic()
        time.sleep(args.seconds)
        t1 = time.monotonic()
        tokens = streams.tokens_between(t0, t1)
        itl = [g for t, g in streams.gaps if t0 <= t < t1]
    finally:
        streams.stop()
        m = er.experts.metrics()
        aengine.shutdown()
        er.close()
    return {"mode": mode, "plan": plan.describe(), "tokens_per_s": tokens / (t1 - t0), "tokens": tokens,
            "requests": sum(1 for _ in streams.results), "failures": streams.failures[:5],
            "itl_ms": 1e3 * statistics.median(itl) if itl else None,
            "retries": m["retries"], "link_failures": m.get("link_failures", 0), "results": streams.results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moge")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-gpus", type=float, default=0.25)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup-s", type=float, default=5)
    ap.add_argument("--modes", default="off,stream,stream+pp")
    ap.add_argument("--deadline-s", type=float, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import ray

    from cluster.cli.local_cluster import start_ray
    from cluster.config import MogeConfig
    from cluster.elastic.stack import start_elastic

    def give_up() -> None:
        print(f"served_dispatcher: past the {args.deadline_s:.0f} s deadline; stopping", file=sys.stderr, flush=True)
        import os

        os._exit(3)

    timer = threading.Timer(args.deadline_s, give_up)
    timer.daemon = True
    timer.start()
    gpu = args.device == "cuda"
    start_ray(num_cpus=4 + args.workers)
    config = MogeConfig.load(
        env={},
        model={"source": f"preset:{args.preset}", "device": args.device, "dtype": args.dtype, "max_model_len": 512},
        engine={"max_num_seqs": max(8, args.streams), "num_kv_blocks": 64 * max(8, args.streams)},
        data_plane={"transport": "grpc", "num_workers": args.workers, "worker_num_gpus": args.worker_gpus if gpu else 0,
                    "worker_num_cpus": 1 if gpu else 0.25, "call_timeout_s": 60},
        elastic={"key_prefix": f"bench-{uuid.uuid4().hex[:6]}",
                 "policy": {"name": "none", "min_devices": 1, "max_devices": args.workers}},
    )
    stack = start_elastic(config, namespace=f"bench-{uuid.uuid4().hex[:6]}")
    rows = []
    try:
        for mode in [m for m in args.modes.split(",") if m]:
            started = time.monotonic()
            try:
                row = run_mode(stack, mode, args)
            except Exception as exc:  # noqa: BLE001 - report the mode as failed, measure the rest
                row = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "results"}), flush=True)
    finally:
        stack.stop()
        ray.shutdown()
    first = next((r for r in rows if "results" in r), None)
    for r in rows:
        if "results" in r and first is not None:
            shared = set(r["results"]) & set(first["results"])
            r["same_tokens_as_first"] = all(r["results"][p] == first["results"][p] for p in shared) and bool(shared)
    print("\n| mode | plan | tokens/s | ITL ms (median) | same tokens | failures |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | FAILED: {r['error'][:80]} | | | | |")
            continue
        gap = f"{r['itl_ms']:.1f}" if r["itl_ms"] is not None else "-"
        print(f"| {r['mode']} | {r['plan']} | {r['tokens_per_s']:.0f} | {gap} | {r.get('same_tokens_as_first')} "
              f"| {len(r['failures'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "results"} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
