"""Scale-up latency, throughput while scaling, and peak extra memory of a live migration.

  PYTHONPATH=. flock /tmp/moge-cpu.lock python bench/scale_latency.py                # tiny-moge, CPU
  PYTHONPATH=. python bench/scale_latency.py --model preset:bench-moge --device cuda --gpus-per-worker 1

In one run, under a constant load of --concurrency greedy streams on one attention replica:
  elastic     controller.scale(N -> N+1): decision -> the new worker serves (every replica acknowledged
              the epoch that routes to it), from the operation's journaled timeline;
  baseline    what replica-level scaling does instead: start a whole new replica of the same model
              (a Ray actor that loads attention + every expert group and builds an engine) and
              switch to it = its first generated token;
  throughput  tokens/s during the scale-up / tokens/s in the steady window before it;
  memory      peak of the summed expert bytes held by all workers during the scale-up, minus before.
Prints one JSON object (add --out FILE to keep it).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import ray


@ray.remote
class WholeReplica:
    """The baseline: a full replica of the model (attention and every expert group in one actor)."""

    def __init__(self, config: dict) -> None:
        from cluster.serve.replica_engine import build_engine
        from cluster.config import MogeConfig

        self.engine, self.loaded = build_engine(MogeConfig.model_validate(config))

    def first_token(self, prompt: str) -> int:
        from actors.engine.sampling_params import SamplingParams

        self.engine.add_request("warm", self.loaded.tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=1))
        while True:
            for out in self.engine.step():
                if out.new_token_ids:
                    return int(out.new_token_ids[0])


class TokenMeter:
    def __init__(self) -> None:
        self.events: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.events.append((time.monotonic(), n))

    def rate(self, start: float, end: float) -> float:
        with self.lock:
            n = sum(k for t, k in self.events if start <= t < end)
        return n / max(end - start, 1e-9)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:tiny-moge")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--from-workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--steady-s", type=float, default=5.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--standby", type=int, default=0,
                    help="elastic.standby_workers: warm empty workers, so the scale-up skips process start")
    ap.add_argument("--source", default="peer", choices=["peer", "checkpoint"], help="elastic.migration_source")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from actors.engine.async_engine import AsyncEngine
    from actors.engine.sampling_params import SamplingParams
    from cluster.config import MogeConfig
    from cluster.elastic.replica import ElasticReplica
    from cluster.serve.replica_engine import build_engine
    from cluster.elastic.stack import start_elastic
    from cluster.cli.local_cluster import start_ray

    config = MogeConfig.load(
        env={},
        model={"source": args.model, "device": args.device, "dtype": args.dtype},
        engine={"max_num_seqs": max(16, args.concurrency), "num_kv_blocks": 512},
        data_plane={"transport": "grpc", "num_workers": args.from_workers, "worker_num_cpus": 0.25,
                    "worker_num_gpus": args.gpus_per_worker, "ping_pong": False},
        elastic={"key_prefix": "bench", "standby_workers": args.standby, "migration_source": args.source,
                 "policy": {"name": "none", "max_devices": 16}},
    )
    start_ray(4)
    stack = start_elastic(config)
    if args.standby:
        ray.get(stack.controller.replenish_standby.remote(), timeout=300)
    replica = ElasticReplica.connect(stack.config, "bench-replica")
    engine, loaded = build_engine(stack.config, experts=replica.experts)
    aengine = AsyncEngine(engine)
    replica.attach(aengine)
    meter = TokenMeter()
    stop = threading.Event()
    failures: list[str] = []

    def stream(slot: int) -> None:
        import asyncio

        async def go() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    async for out in aengine.generate(f"b{slot}-{n}", loaded.tokenizer.encode(f"load {slot}"),
                                                      SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                                     ignore_eos=True)):
                        meter.add(len(out.new_token_ids))
                except Exception as e:  # noqa: BLE001
                    failures.append(repr(e))

        asyncio.run(go())

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)  # let the streams reach steady state before the window starts
        steady_start = time.monotonic()
        time.sleep(args.steady_s)
        steady_end = time.monotonic()

        held_peak = [0]
        def bytes_held() -> int:
            fleet = replica.fleet
            return sum(ray.get(fleet.handle(w).bytes_held.remote(), timeout=10) for w in fleet.running())

        before = bytes_held()
        sampling = threading.Event()

        def sample_memory() -> None:
            while not sampling.is_set():
                try:
                    held_peak[0] = max(held_peak[0], bytes_held())
                except Exception:  # noqa: BLE001 - a worker starting or stopping
                    pass
                time.sleep(0.02)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        result = ray.get(stack.controller.scale.remote(args.from_workers + 1), timeout=600)
        t1 = time.monotonic()
        sampling.set()
        sampler.join(5)
        tl = result["timeline"]
        elastic_s = tl["done"] - tl["decision"]
        scaling_rate = meter.rate(t0, t1)
        steady_rate = meter.rate(steady_start, steady_end)

        b0 = time.monotonic()
        whole = WholeReplica.options(num_cpus=0.25, num_gpus=args.gpus_per_worker).remote(config.model_dump(mode="json"))
        ray.get(whole.first_token.remote("baseline"), timeout=600)
        baseline_s = time.monotonic() - b0
        ray.kill(whole)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        aengine.shutdown()
        replica.close()
        stack.stop()
        ray.shutdown()

    out = {
        "model": args.model, "device": args.device, "workers": f"{args.from_workers}->{args.from_workers + 1}",
        "standby_workers": args.standby, "migration_source": args.source, "from_standby": result.get("from_standby", []),
        "concurrency": args.concurrency, "phase": result["phase"],
        "scale_up_s": round(elastic_s, 3),
        "scale_up_breakdown_s": {k: round(v - tl["decision"], 3) for k, v in sorted(tl.items(), key=lambda kv: kv[1])},
        "baseline_new_replica_s": round(baseline_s, 3),
        "ratio_elastic_over_baseline": round(elastic_s / baseline_s, 3),
        "steady_tokens_per_s": round(steady_rate, 1),
        "scaling_tokens_per_s": round(scaling_rate, 1),
        "throughput_share_during_scaling": round(scaling_rate / steady_rate, 3) if steady_rate else None,
        "expert_bytes_before": before,
        "peak_extra_bytes_during_migration": max(0, held_peak[0] - before),
        "failed_requests": len(failures),
    }
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
