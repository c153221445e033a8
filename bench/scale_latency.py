"""Live scale-up and scale-down under load: latency, throughput while scaling, failed requests,
tokens against a static run, peak extra device memory, and the new-replica baseline, in one run.

  PYTHONPATH=. flock /tmp/moge-cpu.lock python bench/scale_latency.py --local              # tiny-moge, CPU
  PYTHONPATH=. python bench/scale_latency.py --local --model preset:bench-moge --device cuda \
      --dtype bfloat16 --gpus-per-worker 1 --standby 1 --sources device,object_store --out scale.json

--local (the one-device case): the attention replica (this process) holds every expert group on
its device; scale 1 -> 2 moves half the groups to an expert worker on a second device, 2 -> 1 moves
them back. Without --local: --from-workers expert workers -> one more. For each source in --sources
(device = NCCL/HCCL/gloo peer copy, object_store = host buffers through Ray's object store,
checkpoint), in the same run, under --concurrency greedy streams:
  scale_up     decision -> the new device serves (every replica acknowledged the epoch routing to
               it: the timeline's "dropping" mark) and -> operation done
  scale_down   the same back to the smaller size
  throughput   tokens/s during the scale-up, and in the 2 s after the decision, / steady tokens/s
  memory       per process: torch.cuda.max_memory_allocated during the operation minus what was
               allocated before (the replica's device and the worker's)
  tokens       every request's greedy tokens against the same prompt's tokens in a static run
               (before any scaling: the single-process model in --local mode); failures counted
then the baseline: a whole new replica (attention + every group, a Ray actor) to its first token,
started in sequence once the elastic part released its devices.

Never waits on a resource it cannot get: with --gpus-per-worker >= 1 this process first reserves
one GPU from Ray for its own replica (so a worker can never be placed on it), every Ray call has a
deadline, the baseline runs only once a GPU is free (checked, with a deadline), and --deadline-s
ends the whole run with a message saying where it stood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time

import ray


class StageTimeout(RuntimeError):
    pass


@ray.remote
class GpuLease:
    """Holds one GPU in Ray's accounting for the driver's replica, so no worker lands on it."""

    def gpu_ids(self) -> list:
        return [int(i) for i in ray.get_gpu_ids()]


@ray.remote
class WholeReplica:
    """The baseline: a full replica of the model (attention and every expert group in one actor)."""

    def __init__(self, config: dict) -> None:
        from cluster.config import MogeConfig
        from cluster.replica.assemble import build_engine

        self.engine, self.loaded = build_engine(MogeConfig.model_validate(config))

    def first_token(self, prompt: str) -> int:
        from actors.engine.sampling_params import SamplingParams

        self.engine.add_request("warm", self.loaded.tokenizer.encode(prompt), SamplingParams(temperature=0, max_tokens=1))
        while True:
            for out in self.engine.step():
                if out.new_token_ids:
                    return int(out.new_token_ids[0])


class Streams:
    """`n` greedy streams on their own event loop; every finished request is checked against the
    static run's tokens for its prompt (once `reference` is set)."""

    def __init__(self, engine, tokenizer, n: int, max_tokens: int) -> None:
        self.engine, self.tok, self.n, self.max_tokens = engine, tokenizer, n, max_tokens
        self.prompts = [f"load {i}: the expert groups move" for i in range(n)]
        self.reference: dict[str, list[int]] = {}
        self.events: list[tuple[float, int]] = []
        self.failures: list[str] = []
        self.mismatches: list[str] = []
        self.finished = 0
        # (finished at, mismatch?) of every request: requests that ended before the first scaling
        # decision ran on the static placement, so a mismatch there is not the migration's (batch
        # composition: the GPU kernels choose paths and splits by batch size)
        self.done_at: list[tuple[float, bool]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def generate(self, rid: str, prompt: str) -> list[int]:
        from actors.engine.sampling_params import SamplingParams

        ids: list[int] = []
        async for out in self.engine.generate(rid, self.tok.encode(prompt), SamplingParams(
                temperature=0, max_tokens=self.max_tokens, ignore_eos=True)):
            ids.extend(out.new_token_ids)
            with self.lock:
                self.events.append((time.monotonic(), len(out.new_token_ids)))
        return ids

    async def static_run(self) -> None:
        outs = await asyncio.gather(*(self.generate(f"ref-{i}", p) for i, p in enumerate(self.prompts)))
        self.reference = dict(zip(self.prompts, outs))

    async def _one(self, slot: int) -> None:
        k = 0
        while not self.stop.is_set():
            prompt = self.prompts[(slot + k) % self.n]
            rid = f"s{slot}-{k}"
            k += 1
            try:
                ids = await self.generate(rid, prompt)
            except Exception as e:  # noqa: BLE001 - counted, never tolerated silently
                self.failures.append(f"{rid}: {type(e).__name__}: {e}")
                continue
            with self.lock:
                self.finished += 1
                bad = ids != self.reference[prompt]
                self.done_at.append((time.monotonic(), bad))
                if bad:
                    self.mismatches.append(rid)

    async def _main(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.n)))

    def rate(self, start: float, end: float) -> float:
        with self.lock:
            n = sum(k for t, k in self.events if start <= t < end)
        return n / max(end - start, 1e-9)


def _get(ref, timeout_s: float, what: str):
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise StageTimeout(f"{what} did not finish within {timeout_s:.0f}s") from None


def _cuda_mem(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"allocated": 0, "peak": 0}
    return {"allocated": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:tiny-moge")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--local", action="store_true", help="one device: the replica holds every group; scale 1 <-> 2")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--from-workers", type=int, default=1, help="without --local: workers before the scale-up")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--steady-s", type=float, default=4.0)
    ap.add_argument("--settle-s", type=float, default=3.0, help="load between the scale-up and the scale-down")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--standby", type=int, default=0,
                    help="elastic.standby_workers: warm empty workers, so the scale-up skips process start")
    ap.add_argument("--sources", default=None, help="comma-separated migration sources to compare in this run "
                    "(device, object_store, peer, checkpoint); default device,object_store")
    ap.add_argument("--source", default=None, help="one source (older spelling of --sources)")
    ap.add_argument("--stage-timeout-s", type=float, default=180.0, help="deadline of each operation / wait")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="the whole run")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    sources = (args.sources or args.source or "device,object_store").split(",")

    stage = {"now": "start"}

    def on_alarm(*_):
        raise StageTimeout(f"run deadline of {args.deadline_s:.0f}s reached during: {stage['now']}")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.deadline_s))
    out: dict = {"model": args.model, "device": args.device, "dtype": args.dtype, "local": args.local,
                 "sources": sources, "concurrency": args.concurrency, "standby_workers": args.standby}
    try:
        _run(args, sources, stage, out)
    except StageTimeout as e:
        out["error"] = str(e)
        print(f"scale_latency: {e}", file=sys.stderr)
    finally:
        signal.alarm(0)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _run(args, sources: list[str], stage: dict, out: dict) -> None:
    import torch

    from actors.device import resolve_device
    from actors.engine.async_engine import AsyncEngine
    from cluster.cli.local_cluster import start_ray
    from cluster.config import MogeConfig
    from cluster.replica.elastic_side import ElasticReplica
    from cluster.elastic.stack import start_elastic
    from cluster.elastic.worker_fleet import WorkerFleet
    from cluster.replica.assemble import build_engine

    stage["now"] = "starting Ray"
    start_ray(4)
    lease = None
    device_name = args.device
    whole_gpus = args.gpus_per_worker if args.device.startswith("cuda") else 0
    if args.local and args.device.startswith("cuda") and args.gpus_per_worker >= 1:
        stage["now"] = "reserving this replica's GPU"
        if ray.cluster_resources().get("GPU", 0) < 2:
            raise StageTimeout(f"needs 2 GPUs in Ray, it sees {ray.cluster_resources().get('GPU', 0)}")
        lease = GpuLease.options(num_gpus=1, num_cpus=0).remote()
        gpu = _get(lease.gpu_ids.remote(), 60, "reserving a GPU for the replica")[0]
        device_name = f"cuda:{gpu}"
        torch.cuda.set_device(gpu)  # this thread's CUDA calls without a device go to the replica's GPU
    out["replica_device"] = device_name
    n_before = 1 if args.local else args.from_workers
    config = MogeConfig.load(
        env={},
        model={"source": args.model, "device": device_name, "dtype": args.dtype},
        engine={"max_num_seqs": max(16, args.concurrency), "num_kv_blocks": 512},
        data_plane={"transport": "grpc", "num_workers": max(1, args.from_workers), "worker_num_cpus": 0.25,
                    "worker_num_gpus": args.gpus_per_worker, "ping_pong": False},
        elastic={"key_prefix": "bench", "standby_workers": args.standby, "local_groups": args.local,
                 "migration_source": sources[0], "migration_deadline_s": min(60.0, args.stage_timeout_s / 2),
                 # the controller's loop stays out of the way: standbys are refilled by this script
                 # only when a device is free, so a refill never waits on a device it cannot get
                 "policy": {"name": "none", "max_devices": 16, "period_s": 3600}},
    )
    stage["now"] = "starting the elastic stack (Redis, controller, first placement)"
    stack = start_elastic(config)
    controller = stack.controller
    device = resolve_device(device_name)
    aengine = replica = streams = None
    try:
        if args.standby:
            stage["now"] = "starting the standby worker"
            _get(controller.replenish_standby.remote(), args.stage_timeout_s, stage["now"])
        stage["now"] = "building the replica"
        replica = ElasticReplica.connect(stack.config, "bench-replica")
        engine, loaded = build_engine(stack.config, experts=replica.experts)
        aengine = AsyncEngine(engine)
        replica.attach(aengine)
        streams = Streams(aengine, loaded.tokenizer, args.concurrency, args.max_tokens)
        stage["now"] = "static run (reference tokens)"
        asyncio.run(asyncio.wait_for(streams.static_run(), args.stage_timeout_s))
        streams.thread.start()
        time.sleep(1.0)  # streams reach steady state
        fleet = WorkerFleet(stack.config, stack.namespace)
        runs = []
        first_decision = None
        for source in sources:
            stage["now"] = f"{source}: steady window"
            s0 = time.monotonic()
            time.sleep(args.steady_s)
            steady = streams.rate(s0, time.monotonic())
            run = {"source": source, "steady_tokens_per_s": round(steady, 1)}
            standby = [w for w in fleet.running()]
            _reset_peak(device)
            mem_before = _cuda_mem(device)
            for w in standby:
                _get(fleet.handle(w).memory.remote(True), 30, "worker memory")
            stage["now"] = f"{source}: scale {n_before} -> {n_before + 1}"
            t0 = time.monotonic()
            first_decision = first_decision or t0
            up = _get(controller.scale.remote(n_before + 1, "bench", source), args.stage_timeout_s, stage["now"])
            t1 = time.monotonic()
            run["scale_up"] = _op_summary(up, t0, t1, streams, steady)
            run["scale_up"]["memory_extra_bytes"] = {
                "replica": _cuda_mem(device)["peak"] - mem_before["allocated"],
                # a new or standby worker held nothing before (its peak was reset above)
                **{w: _get(fleet.handle(w).memory.remote(), 30, "worker memory")["peak"]
                   for w in up.get("workers", []) if w not in standby or w in up.get("from_standby", [])}}
            stage["now"] = f"{source}: serving on {n_before + 1} devices"
            time.sleep(args.settle_s)
            _reset_peak(device)
            mem_before = _cuda_mem(device)
            stage["now"] = f"{source}: scale {n_before + 1} -> {n_before}"
            t0 = time.monotonic()
            down = _get(controller.scale.remote(n_before, "bench", source), args.stage_timeout_s, stage["now"])
            t1 = time.monotonic()
            run["scale_down"] = _op_summary(down, t0, t1, streams, steady)
            run["scale_down"]["memory_extra_bytes"] = {"replica": _cuda_mem(device)["peak"] - mem_before["allocated"]}
            if replica.local is not None:
                run["scale_down"]["replica_fetches"] = replica.local.fetches[-1:]
            if args.standby:
                stage["now"] = f"{source}: refilling the standby (its device is free again)"
                _get(controller.replenish_standby.remote(), args.stage_timeout_s, stage["now"])
            runs.append(run)
        time.sleep(2.0)  # the last 2 s window
        for run in runs:
            for key in ("scale_up", "scale_down"):
                _fill_after(run[key], streams, run["steady_tokens_per_s"])
        out["runs"] = runs
        stage["now"] = "stopping the load"
        streams.stop.set()
        streams.thread.join(args.stage_timeout_s)
        out["requests_finished"] = streams.finished
        out["failed_requests"] = len(streams.failures)
        out["failures_sample"] = streams.failures[:5]
        out["token_mismatches"] = len(streams.mismatches)
        before = [bad for t, bad in streams.done_at if first_decision is None or t < first_decision]
        out["requests_before_any_scaling"] = len(before)
        out["token_mismatches_before_any_scaling"] = sum(before)
        out["tokens_identical_to_static_run"] = not streams.mismatches and streams.finished > 0
    finally:
        if streams is not None:
            streams.stop.set()
        if aengine is not None:
            aengine.shutdown()
        if replica is not None:
            replica.close()
        stack.stop()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_baseline:
        out["baseline_new_replica_s"] = _baseline(args, config, whole_gpus, stage)
        for run in out.get("runs", []):
            s = run["scale_up"].get("to_serving_s")
            if s:
                run["speedup_vs_new_replica"] = round(out["baseline_new_replica_s"] / s, 1)
    if lease is not None:
        ray.kill(lease)
    ray.shutdown()


def _baseline(args, config, gpus: float, stage: dict) -> float:
    """A whole new replica to its first token, once a device is free (checked with a deadline)."""
    stage["now"] = "baseline: waiting for a free device"
    deadline = time.monotonic() + 60
    while gpus and ray.available_resources().get("GPU", 0) < gpus:
        if time.monotonic() > deadline:
            raise StageTimeout(f"baseline: no free GPU 60s after the elastic part released its workers "
                               f"(available {ray.available_resources().get('GPU', 0)})")
        time.sleep(0.2)
    stage["now"] = "baseline: new replica to its first token"
    whole_cfg = config.model_dump(mode="json")
    whole_cfg["model"]["device"] = "cuda" if gpus else config.model.device  # the actor sees its GPU as cuda:0
    whole_cfg["elastic"]["local_groups"] = False
    b0 = time.monotonic()
    whole = WholeReplica.options(num_cpus=0.25, num_gpus=gpus).remote(whole_cfg)
    try:
        _get(whole.first_token.remote("baseline"), args.stage_timeout_s, stage["now"])
        return round(time.monotonic() - b0, 3)
    finally:
        ray.kill(whole)


def _op_summary(result: dict, t0: float, t1: float, streams: Streams, steady: float) -> dict:
    tl = result.get("timeline", {})
    d = tl.get("decision")
    marks = {k: round(v - d, 3) for k, v in sorted(tl.items(), key=lambda kv: kv[1])} if d else {}
    during = streams.rate(t0, t1)
    return {
        "_window": (t0, t1),  # the 2 s share is filled in once those 2 s have passed
        "phase": result.get("phase"), "error": result.get("error"),
        "to_serving_s": marks.get("dropping"),  # every replica acknowledged the new epoch
        "to_done_s": marks.get("done"),
        "timeline_s": marks,
        "moved_bytes": sum(int(a.get("bytes", 0)) for a in result.get("loads", [])),
        "loads": [{k: a[k] for k in ("groups", "source", "seconds", "attempts") if k in a} for a in result.get("loads", [])],
        "from_standby": result.get("from_standby", []),
        "tokens_per_s_during": round(during, 1),
        "share_of_steady_during": round(during / steady, 3) if steady else None,
    }


def _fill_after(summary: dict, streams: Streams, steady: float) -> None:
    t0, t1 = summary.pop("_window")
    after = streams.rate(t0, max(t1, t0 + 2.0))
    summary["share_of_steady_2s_from_decision"] = round(after / steady, 3) if steady else None


if __name__ == "__main__":
    main()
