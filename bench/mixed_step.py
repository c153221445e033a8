"""What a step costs when it carries prompt tokens next to running decodes, full-step CUDA graphs
against eager and against piecewise graphs, plus the engine-level figures of issue 17: prefill of
distinct prompts, the batch-1 step loop against the graph replay alone, TTFT of a long prompt.

    python bench/mixed_step.py --model preset:qwen3-30b-a3b --device cuda --out mixed.jsonl

One engine (CUDA graphs per token bucket, prefix caching off, KV from gpu_memory_utilization):
- step table: D running decodes (prompts of --context tokens) plus one new prompt of P tokens,
  the model step alone (runner.execute over the same scheduled batch, median of --repeats, device
  synchronised around each) as a graph replay (`graphs`), eagerly (`eager`), and for a few shapes
  piecewise (`piecewise`: per layer one graph before attention and one after it, the attention
  kernel launched eagerly between them, as vLLM V1's piecewise mode runs);
- prefill: 8 distinct prompts of 2,048 tokens (fresh random ids per run), add -> every first token,
  graphs and eager;
- batch 1: the engine.step() loop's period (async scheduling on and off) against the bucket-1 graph
  replay alone; TTFT of one 1,024-token prompt on an idle engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.device import synchronize  # noqa: E402
from actors.engine.build import EngineSettings, LoadSpec, build_engine  # noqa: E402
from actors.engine.sampling_params import SamplingParams  # noqa: E402
from actors.engine.scheduler import ScheduledBatch  # noqa: E402

OUT: Path | None = None
RNG = random.Random(0)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


def prompt(n: int) -> list[int]:
    return [RNG.randrange(256) for _ in range(n)]


def sync_time(device, fn) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - t0)


def start_decodes(engine, d: int, context: int, tag: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=engine.spec.max_model_len - context - 1, ignore_eos=True)
    for i in range(d):
        engine.add_request(f"{tag}-{i}", prompt(context), params)
    while engine.stats().tokens_generated < d or engine.stats().waiting:
        engine.step()
    for _ in range(3):
        engine.step()


def mixed_batch(engine, p: int, tag: str) -> ScheduledBatch:
    """The running decodes plus one new prompt of p tokens (uncapped), blocks allocated."""
    sched = engine.scheduler
    if p:
        engine.add_request(tag, prompt(p), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    cap, sched.step_token_cap = sched.step_token_cap, None
    try:
        batch = sched.schedule()
    finally:
        sched.step_token_cap = cap
    return batch


def time_execute(engine, batch, repeats: int) -> float:
    runner = engine.runner
    runner.execute(batch)
    return statistics.median(sync_time(runner.device, lambda: runner.execute(batch)) for _ in range(repeats))


class Piecewise:
    """Per layer: a graph of everything before attention (norm, q/k/v, RoPE + KV write), the varlen
    attention launched eagerly, a graph of everything after it (o_proj, add + norm, router, experts,
    residual); plus embed and head graphs. Captured for one StepBatch of static tensors."""

    def __init__(self, engine, batch) -> None:
        from actors.model.kernels.rope import qk_rope_store

        self.m, self.kv, self.batch = engine.model, engine.runner.kv, batch
        m, kv = self.m, self.kv
        step = m._step_context(batch, kv.block_size, next(m.parameters()).dtype)
        t = batch.num_tokens
        self.pieces = []
        pool = torch.cuda.graph_pool_handle()

        def capture(fn):
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = fn()
            return g, out

        g, h = capture(lambda: m.embed(batch.input_ids))
        self.pieces.append(("graph", g))
        for layer in range(m.cfg.num_layers):
            blk = m.layers[layer]
            att = blk.self_attn

            def pre(h=h, blk=blk, att=att, layer=layer):
                x = blk.input_layernorm(h)
                q = att.q_proj(x).view(t, att.heads, att.head_dim)
                k = att.k_proj(x).view(t, att.kv_heads, att.head_dim)
                v = att.v_proj(x).view(t, att.kv_heads, att.head_dim)
                norms = (att.q_norm.weight, att.k_norm.weight, att.q_norm.eps) if att.qk_norm else (None, None, 0.0)
                qk_rope_store(q, k, v, batch.positions, step.inv_freq, *norms, kv.k[layer], kv.v[layer],
                              batch.slot_mapping)
                return q

            g, q = capture(pre)
            self.pieces.append(("graph", g))
            out = torch.empty_like(q)
            self.pieces.append(("attention", (layer, q, out)))

            def post(h=h, out=out, blk=blk, att=att, layer=layer):
                o = att.o_proj(out.reshape(t, att.heads * att.head_dim))
                h2, x = blk.post_attention_layernorm.add_forward(h, o)
                ids, w = m.route(layer, x)
                routed = None if ids is None else m.experts.dispatch(layer, x, ids, w).wait()
                return m.finish_moe(layer, h2, x, routed)

            g, h = capture(post)
            self.pieces.append(("graph", g))
        g, self.logits = capture(lambda: m.head(h, batch.logits_index))
        self.pieces.append(("graph", g))

    def run(self) -> None:
        from actors.model.kernels.paged_attention import varlen_paged_attention

        b, kv = self.batch, self.kv
        scale = self.m.cfg.head_dim ** -0.5
        for kind, item in self.pieces:
            if kind == "graph":
                item.replay()
            else:
                layer, q, out = item
                out.copy_(varlen_paged_attention(q, kv.k[layer], kv.v[layer], b.block_tables, b.query_start,
                                                 b.context_lens, scale, kv.max_seq_len))


def step_table(engine, args) -> None:
    device = engine.runner.device
    graphs = engine.runner.graphs
    for d in [int(x) for x in args.decodes.split(",")]:
        start_decodes(engine, d, args.context, f"d{d}")
        for p in [0] + [int(x) for x in args.prompts.split(",")]:
            tag = f"p{d}-{p}"
            batch = mixed_batch(engine, p, tag)
            row = {"bench": "step", "decodes": d, "prompt": p, "context": args.context,
                   "tokens": sum(batch.num_new_tokens)}
            row["graphs_ms"] = round(time_execute(engine, batch, args.repeats), 3)
            row["bucket"] = graphs.last_bucket if graphs is not None else None
            if graphs is not None:  # the replay alone, over the buffers this step filled
                row["replay_ms"] = round(graphs.time_replay(graphs.last_bucket, args.repeats), 3)
            if graphs is not None:
                engine.runner.graphs = None
                try:
                    row["eager_ms"] = round(time_execute(engine, batch, args.repeats), 3)
                finally:
                    engine.runner.graphs = graphs
            if graphs is not None and (d, p) in {(1, 0), (128, 0), (128, 256)}:
                # the same step's tensors, captured piecewise over the graphs' static buffers
                inputs = __import__("actors.engine.steps.step_inputs", fromlist=["build_inputs"]).build_inputs(
                    batch.seqs, batch.num_new_tokens, engine.runner.block_size)
                graphs.run(inputs)  # fills the static buffers for this step's bucket
                static, _ = graphs.batch(graphs.last_bucket, inputs.max_query)
                pw = Piecewise(engine, static)
                pw.run()
                row["piecewise_ms"] = round(statistics.median(sync_time(device, pw.run) for _ in range(args.repeats)), 3)
                del pw
            if p:
                engine.abort_request(tag)
            emit(row)
        for rid in engine.unfinished_request_ids():
            engine.abort_request(rid)
        while engine.has_unfinished():
            engine.step()


def kernel_profile(engine, n: int, length: int) -> None:
    """Device time by kernel over one prefill of n distinct prompts (torch.profiler), top 12."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"kp-{i}", prompt(length), params)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
        synchronize(engine.runner.device)
    by_name: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            key = e.name[:60]
            by_name[key] = by_name.get(key, 0.0) + (e.time_range.end - e.time_range.start) / 1000
    total = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    emit({"bench": "prefill_kernels", "device_ms": round(total, 2), "top_ms": {k: round(v, 2) for k, v in top}})


def prefill(engine, n: int, length: int, label: str) -> None:
    device = engine.runner.device
    rates = []
    for run in range(3):
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        for i in range(n):
            engine.add_request(f"pf{label}{run}-{i}", prompt(length), params)  # fresh ids: no cache hits

        def go():
            while engine.has_unfinished():
                engine.step()

        rates.append(n * length / (sync_time(device, go) / 1000))
    emit({"bench": "prefill", "system": label, "prompts": n, "prompt_tokens": length,
          "tokens_per_s": round(max(rates)), "all_runs": [round(r) for r in rates]})


def batch_one(engine, args) -> None:
    device = engine.runner.device
    graphs = engine.runner.graphs
    for mode in (True, False):
        engine.async_scheduling = mode
        params = SamplingParams(temperature=0, max_tokens=args.steps + 40, ignore_eos=True)
        engine.add_request(f"b1-{mode}", prompt(args.context), params)
        for _ in range(20):
            engine.step()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        synchronize(device)
        period = 1000 * (time.perf_counter() - t0) / args.steps
        row = {"bench": "batch1", "async_scheduling": mode, "step_period_ms": round(period, 3)}
        if graphs is not None:
            row["graph_replay_ms"] = round(graphs.time_replay(1, 50), 3)
            row["period_over_replay"] = round(period / row["graph_replay_ms"], 3)
        emit(row)
        engine.abort_request(f"b1-{mode}")
        while engine.has_unfinished():
            engine.step()
    engine.async_scheduling = True
    times = []
    for run in range(4):
        engine.add_request(f"ttft{run}", prompt(1024), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        synchronize(device)
        t0 = time.perf_counter()
        first = None
        while first is None:
            for out in engine.step():
                if out.new_token_ids:
                    first = time.perf_counter()
        times.append(1000 * (first - t0))
        while engine.has_unfinished():
            engine.step()
    emit({"bench": "ttft_1024_idle", "ms": round(min(times[1:]), 2), "all_ms": [round(t, 2) for t in times]})


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="preset:tiny-moge")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--decodes", default="1,32,128")
    ap.add_argument("--prompts", default="16,256,2048")
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--skip", default="", help="comma list of steps,prefill,batch1")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    OUT = Path(args.out) if args.out else None
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("actors.engine").setLevel(logging.INFO)
    skip = set(args.skip.split(","))
    t0 = time.perf_counter()
    engine, _ = build_engine(
        LoadSpec(args.model, args.dtype, args.device, max_model_len=args.max_model_len),
        EngineSettings(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=False))
    graphs = engine.runner.graphs
    emit({"bench": "build", "seconds": round(time.perf_counter() - t0, 1), "kv_blocks": engine.spec.num_kv_blocks,
          "graph_sizes": sorted(graphs.graphs) if graphs else [],
          "graph_memory_mib": round(graphs.memory_bytes / 2**20) if graphs else 0,
          "step_costs": engine.step_costs.describe() if engine.step_costs else None})
    if "steps" not in skip:
        step_table(engine, args)
    if "prefill" not in skip:
        prefill(engine, 8, 2048, "graphs" if graphs is not None else "eager")
        if graphs is not None:
            kernel_profile(engine, 8, 2048)
        if graphs is not None:
            engine.runner.graphs = None
            try:
                prefill(engine, 8, 2048, "eager")
            finally:
                engine.runner.graphs = graphs
    if "batch1" not in skip:
        batch_one(engine, args)


if __name__ == "__main__":
    main()
