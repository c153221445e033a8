"""The NCCL step lane on two GPUs, without Ray (attention on cuda:0, every expert group on cuda:1).

    python bench/nccl_lane.py p2p    # torch.distributed NCCL send/recv per layer: eager vs CUDA graph
    python bench/nccl_lane.py engine --preset bench-moge --batch-sizes 1,64,128,256

p2p: two processes, a per-pair ProcessGroupNCCL; per layer [B, 2064] bf16 out, a 2048x2048 matmul on
the far side, [B, 2048] back, 12 layers a step; eager (both sides launch per layer) vs both sides
capturing the 12 layers in one CUDA graph. Also the per-step header round trip (device int64 [16]
over NCCL, read on the host) against the same doorbell over gloo.

engine: decode step latency of the monolithic engine on cuda:0 vs the step lane (model on cuda:0,
the Dispatcher over a LaneCarrier, worker process on cuda:1 running captured per-bucket layer loops), with and
without ping-pong. Columns: step_ms (median decode step), tok_s, tok_s_per_gpu (remote: /2),
lane_ms (worker wall per step: header to last partial sent), compute_ms (the worker's held groups
for the step's layers, captured alone), inproc_ms (the same groups through LocalExperts' stacked
path, captured: what the monolithic engine spends on routed experts), transport_share =
max(0, lane - compute) / step (lane wall includes waiting for the replica's attention), and
transport_share_est = max(0, step - (monolithic step - inproc) - compute) / step (serial estimate).
MOGE_LANE_GRAPHS=0 keeps the worker's layer loops eager (no CUDA graphs); MOGE_REPLICA_GRAPHS=0 keeps
the replica's decode steps eager (by default each bucket is one captured step, lane ops inside).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

L, D, EXTRA = 12, 2048, 16


def _pair(rank: int, port: int):
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(days=1)
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, 2, opts)
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, 2, datetime.timedelta(seconds=60))
    return pg, gloo


def _p2p_proc(rank: int, port: int, batches: list[int], iters: int, q) -> None:
    pg, gloo = _pair(rank, port)
    peer = 1 - rank
    dev = torch.device("cuda", rank)
    w = torch.randn(D, D, device=dev, dtype=torch.bfloat16) / D**0.5
    rows = []

    def step(out_buf, in_buf, back_buf):
        for _ in range(L):
            if rank == 0:
                pg.send([out_buf], peer, 1)
                pg.recv([back_buf], peer, 2).wait()
            else:
                pg.recv([in_buf], peer, 1).wait()
                torch.matmul(in_buf[:, :D], w, out=back_buf)
                pg.send([back_buf], peer, 2).wait()

    # header round trip: NCCL device tensor read on the host vs a gloo CPU doorbell
    hdr = torch.zeros(16, dtype=torch.int64, device=dev)
    hcpu = torch.zeros(16, dtype=torch.int64)
    for name, fn in [("nccl_header_rtt", lambda: _rtt(pg, hdr, rank, peer, dev=True)),
                     ("gloo_doorbell_rtt", lambda: _rtt(gloo, hcpu, rank, peer, dev=False))]:
        for _ in range(20):
            fn()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        if rank == 0:
            rows.append({"what": name, "us": 1e6 * (time.perf_counter() - t0) / 200})

    stream = torch.cuda.Stream()
    for b in batches:
        out_buf = torch.randn(b, D + EXTRA, device=dev, dtype=torch.bfloat16)
        in_buf = torch.empty_like(out_buf)
        back_buf = torch.empty(b, D, device=dev, dtype=torch.bfloat16)
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(out_buf, in_buf, back_buf)
            torch.cuda.synchronize()
            gloo.barrier().wait()
            t0 = time.perf_counter()
            for _ in range(iters):
                step(out_buf, in_buf, back_buf)
            torch.cuda.synchronize()
            eager = (time.perf_counter() - t0) / iters
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                step(out_buf, in_buf, back_buf)
            gloo.barrier().wait()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            gloo.barrier().wait()
            t0 = time.perf_counter()
            for _ in range(iters):
                graph.replay()
            torch.cuda.synchronize()
            graphed = (time.perf_counter() - t0) / iters
        if rank == 0:
            rows.append({"what": "p2p_step", "batch": b, "layers": L,
                         "eager_ms": 1e3 * eager, "graph_ms": 1e3 * graphed,
                         "eager_us_per_layer": 1e6 * eager / L, "graph_us_per_layer": 1e6 * graphed / L})
    gloo.barrier().wait()
    if rank == 0:
        q.put(rows)


def _rtt(pg, t, rank, peer, dev: bool) -> None:
    if rank == 0:
        pg.send([t], peer, 5).wait()
        pg.recv([t], peer, 6).wait()
        t.tolist() if dev else None
    else:
        pg.recv([t], peer, 5).wait()
        t.tolist()
        pg.send([t], peer, 6).wait()
        if dev:
            torch.cuda.current_stream().synchronize()


def p2p(args) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29600 + os.getpid() % 1000
    batches = [int(b) for b in args.batch_sizes.split(",")]
    procs = [ctx.Process(target=_p2p_proc, args=(r, port, batches, args.iters, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    rows = q.get(timeout=300)
    for p in procs:
        p.join(30)
    return rows


# ---- engine -------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine(preset: str, batch_max: int, prompt_len: int, steps: int, ping_pong: bool, dtype: str, device: str,
            experts=None):
    """The engine from plain settings (no pydantic, no Ray on the device)."""
    from actors.engine.build import EngineSettings, LoadSpec, build_engine

    load = LoadSpec(f"preset:{preset}", dtype, device, max_model_len=512)
    settings = EngineSettings(max_num_seqs=batch_max, max_num_batched_tokens=8192, ping_pong=ping_pong,
                              num_kv_blocks=batch_max * ((prompt_len + steps + 8) // 16 + 2))
    return build_engine(load, settings, experts)


def _decode_steps(engine, vocab: int, b: int, prompt_len: int, steps: int) -> float:
    from actors.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(b):
        engine.add_request(f"{b}-{i}", [(i * 31 + j) % vocab for j in range(prompt_len)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine._seqs.values()):
        engine.step()
    for _ in range(2):
        engine.step()  # decode warm-up: kernels, and the worker captures this bucket's graph
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        _sync()
        times.append(time.perf_counter() - t0)
    for rid in list(engine._seqs):
        engine.abort_request(rid)
    return statistics.median(times)


def engine(args) -> list[dict]:
    from actors.experts.lane_pair import NoCarrier, spawn_worker
    from actors.experts.placement import pack_groups
    from actors.experts.dispatch.dispatcher import Dispatcher
    from actors.experts.lane.step_lane import LaneCarrier
    from actors.experts.worker.spec import model_config_of
    batches = [int(b) for b in args.batch_sizes.split(",")]
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.set_device(0)
    rows = []
    mono, loaded = _engine(args.preset, max(batches), args.prompt_len, args.steps, False, args.dtype, args.device)
    vocab = loaded.cfg.vocab_size
    mono_ms = {}
    for b in batches:
        mono_ms[b] = _decode_steps(mono, vocab, b, args.prompt_len, args.steps)
        rows.append({"mode": "monolithic", "batch": b, "step_ms": 1e3 * mono_ms[b], "tok_s": b / mono_ms[b],
                     "tok_s_per_gpu": b / mono_ms[b]})
        print(json.dumps(rows[-1]), flush=True)
    del mono, loaded
    if gpu:
        torch.cuda.empty_cache()

    spec = {"source": f"preset:{args.preset}", "dtype": args.dtype, "device": "cuda:1" if gpu else "cpu", "seed": 0}
    cfg = model_config_of(spec)
    with spawn_worker(spec, list(range(cfg.n_groups))) as ref:
        # worker compute timings first: they capture graphs, which must not meet an open lane's
        # posted NCCL receive (seen hanging on 2x H200)
        timings = {b: ref.local.time_lane_compute(b, 10) for b in batches}
        for ping_pong in [m == "on" for m in args.ping_pong.split(",")]:
            placement = pack_groups(cfg.n_groups, [ref.worker_id])
            experts = Dispatcher(cfg, NoCarrier(), placement, {ref.worker_id: ref},
                                 step_carrier=LaneCarrier("cuda:0" if gpu else "cpu", timeout_s=60))
            eng, _ = _engine(args.preset, max(batches), args.prompt_len, args.steps, ping_pong, args.dtype,
                             args.device, experts)
            for b in batches:
                before = ref.local.lane_stats()
                step = _decode_steps(eng, vocab, b, args.prompt_len, args.steps)
                after = ref.local.lane_stats()
                n = max(1, after["steps"] - before["steps"])
                lane = (after["wall_s"] - before["wall_s"]) / n  # per lane-step (ping-pong: per micro-batch)
                timing = timings[b]
                rows.append({"mode": "steplane" + ("+pingpong" if ping_pong else ""), "batch": b,
                             "step_ms": 1e3 * step, "tok_s": b / step, "tok_s_per_gpu": b / step / 2,
                             "vs_mono_per_gpu": mono_ms[b] / step / 2, "lane_ms": 1e3 * lane,
                             "compute_ms": 1e3 * timing["lane_s"], "inproc_ms": 1e3 * timing["local_s"],
                             "transport_share": max(0.0, lane - timing["lane_s"]) / step,
                             # the step minus what the monolithic step spends outside its experts
                             # minus the worker's compute: the wire and both hosts' waiting
                             "transport_share_est": max(0.0, step - (mono_ms[b] - timing["local_s"])
                                                        - timing["lane_s"]) / step,
                             "graph_replays": after["graph_replays"], "capture_errors": after.get("capture_errors"),
                             # replica side: whole decode steps replayed with the lane ops inside
                             "replica_graphs": os.environ.get("MOGE_REPLICA_GRAPHS", "1") != "0",
                             "replica_graph_replays": experts.per_step.graph_replays,
                             "replica_graph_stale": experts.per_step.graph_stale,
                             "lane_failures": experts.per_step.link_failures})
                print(json.dumps(rows[-1]), flush=True)
            experts.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["p2p", "engine"])
    ap.add_argument("--preset", default="bench-moge")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (gloo)")
    ap.add_argument("--batch-sizes", default="1,64,128,256")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--ping-pong", default="off,on", help="engine: step-lane runs without/with ping-pong")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = p2p(args) if args.what == "p2p" else engine(args)
    if args.what == "p2p":
        for r in rows:
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
