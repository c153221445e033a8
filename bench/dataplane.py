"""Decode throughput and step latency: monolithic engine vs the disaggregated data plane.

    python bench/dataplane.py --preset bench-moge --batch-sizes 1,8,32,64,128,256 \
        --transports grpc,grpc+stream,collective,collective+lane --workers 2 --out bench_dataplane.json

A transport named "X+lane" runs the step lane (data_plane.per_step: lane: one header per step, one
packed tensor out and the partials back per MoE layer, nccl between GPUs, worker-side CUDA graphs;
X only carries failover calls); "grpc+stream" the per-step gRPC stream (data_plane.per_step:
stream: one bidirectional stream per worker). For the lane, busy_ms is the worker's lane wall time
per step (header to last partial: compute plus waiting for the replica's attention), so
transport_share is not defined (reported as 0); bench/nccl_lane.py separates compute from wall.
--ping-pong off,on runs each remote mode both ways (default both).

Every mode runs its attention replica as a Ray actor with one GPU (so Ray never hands the same GPU
to a worker and the replica); expert workers get --worker-gpus each (fractions share a GPU; the
collective transport needs the replica and each worker on distinct GPUs: NCCL refuses two ranks on
one device). For each batch size B: B sequences with a --prompt-len token prompt are prefilled,
then --steps decode steps are timed (the engine's step ends with a host copy of the sampled ids,
so each step is synchronised).

Columns: step_ms (median decode step), tok_s = B / step, blocked_ms (time the replica waited in
dispatch + wait of the routed experts per step), busy_ms (the busiest worker's compute per step),
transport_share = max(0, blocked - busy) / step: the part of the step spent moving activations and
waiting on the wire rather than computing. Monolithic: blocked = busy = local expert compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class TimedExperts:
    """ExpertCompute proxy: wall time the caller spends blocked in dispatch() and wait()."""

    def __init__(self, inner) -> None:
        self.inner, self.blocked_s = inner, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch(self, layer, x, ids, weights):
        t0 = time.perf_counter()
        pending = self.inner.dispatch(layer, x, ids, weights)
        self.blocked_s += time.perf_counter() - t0
        outer = self

        class _Timed:
            def wait(self):
                t1 = time.perf_counter()
                y = pending.wait()
                outer.blocked_s += time.perf_counter() - t1
                return y

        return _Timed()


def measure(config_dict: dict, mode: str, batch_sizes: list[int], prompt_len: int, steps: int, namespace: str) -> list[dict]:
    """Runs inside the replica actor."""
    import ray
    import torch

    from actors.device import synchronize
    from cluster.replica.assemble import build_engine
    from actors.engine.sampling_params import SamplingParams
    from cluster.config import MogeConfig
    from cluster.replica.workers import ReplicaWorkers
    from cluster.replica.assemble import assemble

    config = MogeConfig.model_validate(config_dict)
    remote = None
    if mode == "monolithic":
        engine, loaded = build_engine(config)
    else:
        parts = assemble(config, workers=ReplicaWorkers(config, namespace=namespace))
        engine, loaded, remote = parts.engine, parts.loaded, parts.experts
    timed = TimedExperts(loaded.model.experts)
    loaded.model.experts = timed
    vocab = loaded.cfg.vocab_size
    rows = []
    for b in batch_sizes:
        params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"{b}-{i}", [(i * 31 + j) % vocab for j in range(prompt_len)], params)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine._seqs.values()):
            engine.step()  # prefill (possibly chunked)
        engine.step()  # first decode step: kernels for this batch shape
        busy0 = _worker_busy(remote)
        blocked0 = timed.blocked_s
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            synchronize(loaded.device)
            times.append(time.perf_counter() - t0)
        busy = (_worker_busy(remote) - busy0) / steps if remote else (timed.blocked_s - blocked0) / steps
        blocked = (timed.blocked_s - blocked0) / steps
        step = statistics.median(times)
        rows.append({
            "mode": mode, "batch": b, "step_ms": 1e3 * step, "tok_s": b / step,
            "blocked_ms": 1e3 * blocked, "busy_ms": 1e3 * busy,
            "transport_share": max(0.0, blocked - busy) / step if remote and config.data_plane.per_step != "lane" else 0.0,
        })
        for rid in list(engine._seqs):
            engine.abort_request(rid)
    if remote is not None:
        remote.close()
    del torch, ray
    return rows


def _worker_busy(remote) -> float:
    """Busy seconds of the busiest worker (workers run in parallel)."""
    if remote is None:
        return 0.0
    import ray

    stats = ray.get([ref.handle.stats.remote() for ref in remote.workers.values()])
    return max(s["busy_s"] for s in stats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-moge")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run only")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8,32,64,128,256")
    ap.add_argument("--transports", default="grpc,collective")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-gpus", type=float, default=1.0)
    ap.add_argument("--replica-gpus", type=float, default=1.0)
    ap.add_argument("--ping-pong", default="off,on", help="remote modes with ping-pong off, on, or both")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    import ray

    from cluster.config import MogeConfig
    from cluster.replica.workers import ReplicaWorkers, worker_ids
    from cluster.cli.local_cluster import start_ray

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gpu = args.device == "cuda"
    start_ray(num_cpus=4 + args.workers)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    modes = [("monolithic", None, False)]
    pp = [v == "on" for v in args.ping_pong.split(",") if v]
    for t in [t for t in args.transports.split(",") if t]:
        modes += [(t, t, p) for p in pp]  # "X+lane": transport X with the step lane; "grpc+stream"
    rows: list[dict] = []
    for label, transport, ping_pong in modes:
        carrier, _, per_step = (transport or "inprocess").partition("+")  # "grpc+stream" -> grpc, stream
        config = MogeConfig.load(
            env={},
            model={"source": f"preset:{args.preset}", "device": args.device, "dtype": args.dtype, "max_model_len": 512},
            engine={"max_num_seqs": max(batch_sizes), "max_num_batched_tokens": 8192,
                    "num_kv_blocks": max(batch_sizes) * ((args.prompt_len + args.steps + 8) // 16 + 2)},
            data_plane={"transport": carrier, "per_step": per_step or "off", "num_workers": args.workers,
                        "worker_num_gpus": args.worker_gpus if gpu else 0, "worker_num_cpus": 1 if gpu else 0.25, "ping_pong": ping_pong,
                        "call_timeout_s": 120},
        )
        runner = ray.remote(num_gpus=args.replica_gpus if gpu else 0, num_cpus=1 if gpu else 0.25)(measure)
        name = label if transport is None else f"{label}{'+pingpong' if ping_pong else ''}"
        try:
            got = ray.get(runner.remote(config.model_dump(mode="json"), label, batch_sizes, args.prompt_len,
                                        args.steps, namespace), timeout=1800)
        except Exception as exc:  # noqa: BLE001 - report the mode as failed, keep benchmarking the rest
            print(f"{name}: FAILED: {exc}", file=sys.stderr)
            got = []
        finally:
            if transport is not None:
                ReplicaWorkers(config, namespace=namespace).stop(worker_ids(args.workers))
        for r in got:
            r["mode"] = name
        rows += got
        for r in got:
            print(json.dumps(r), flush=True)

    print("\n| mode | batch | step ms | tokens/s | blocked ms | worker busy ms | transport share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['blocked_ms']:.2f} "
              f"| {r['busy_ms']:.2f} | {100 * r['transport_share']:.0f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
