"""Device time of the varlen paged attention kernel (actors/model/kernels/paged_attention.py) against
the paged decode kernel it replaces for decode steps and against the SDPA path (KV gathered into a
dense copy, masked SDPA) it replaces for prefill, at the Qwen3-30B-A3B attention shape (32 query /
4 KV heads of 128, block 16, bf16), each timed as a CUDA-graph replay with triton.testing.do_bench
(median). For the prefill and mixed shapes a sweep of launch configurations shows what the default
policy picks against the alternatives (TFLOP/s = causal attention FLOPs over the time).

    python bench/attention_check.py --out attention.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.model import kernels  # noqa: E402

HEADS, KV_HEADS, DH, BS = 32, 4, 128, 16
OUT: Path | None = None


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


def graph_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1000 * do_bench(graph.replay, warmup=10, rep=50, return_mode="median")


def make_step(rows, gen):
    """rows: [(new tokens, context after the step)] -> the step's tensors over a random paged cache."""
    from actors.model.kv_cache import PagedKVCache
    from actors.model.step_batch import StepBatch

    b = len(rows)
    width = max(-(-c // BS) for _, c in rows)
    kv = PagedKVCache(1, b * width, BS, KV_HEADS, DH, torch.bfloat16, "cuda")
    kv.k[0].normal_(generator=gen)
    kv.v[0].normal_(generator=gen)
    tables = torch.randperm(b * width, device="cuda", generator=gen).view(b, width)
    counts = torch.tensor([n for n, _ in rows], device="cuda")
    ctx = torch.tensor([c for _, c in rows], device="cuda")
    qs = torch.zeros(b + 1, dtype=torch.long, device="cuda")
    qs[1:] = counts.cumsum(0)
    t = int(qs[-1])
    seq = torch.repeat_interleave(torch.arange(b, device="cuda"), counts)
    positions = torch.arange(t, device="cuda") - qs[seq] + (ctx - counts)[seq]
    q = torch.randn(t, HEADS, DH, device="cuda", generator=gen).bfloat16()
    batch = StepBatch(torch.zeros(t, dtype=torch.long, device="cuda"), positions, qs, ctx, tables,
                      torch.zeros(t, dtype=torch.long, device="cuda"), qs[1:] - 1, max_query=max(n for n, _ in rows))
    flops = sum(4 * HEADS * DH * sum(c - n + i + 1 for i in range(n)) for n, c in rows)
    return q, kv, batch, flops


def sdpa_us(q, kv, batch) -> float:
    from actors.model.attention import paged_attention, plan_attention

    class Step:
        plan = plan_attention(batch, BS)

    kernels.set_enabled(False)
    try:
        return graph_us(lambda: paged_attention(q, 0, batch, kv, Step, DH**-0.5))
    finally:
        kernels.set_enabled(True)


def decode(cases, gen) -> None:
    from actors.model.kernels.paged_attention import POLICY, LaunchConfig, varlen_paged_attention
    from actors.model.kernels.paged_decode import paged_decode_attention

    for b, ctx in cases:
        q, kv, batch, _ = make_step([(1, ctx)] * b, gen)
        args = (q, kv.k[0], kv.v[0], batch.block_tables, batch.query_start, batch.context_lens, DH**-0.5)
        row = {"kernel": "decode", "batch": b, "context": ctx,
               "varlen_us": round(graph_us(lambda: varlen_paged_attention(*args, max_context=4096)), 1),
               "paged_decode_us": round(graph_us(lambda: paged_decode_attention(
                   q, kv.k[0], kv.v[0], batch.block_tables, batch.context_lens, DH**-0.5)), 1),
               "sdpa_us": round(sdpa_us(q, kv, batch), 1),
               "policy": POLICY.config(b, 8, 4096, torch.bfloat16).__dict__}
        if b <= 8:  # the split size the small-launch rule replaced
            cfg = LaunchConfig(16, 64, 16, 256, 4, 2)
            row["varlen_split256_us"] = round(graph_us(lambda: varlen_paged_attention(*args, max_context=4096, config=cfg)), 1)
        kv_bytes = b * ctx * 2 * KV_HEADS * DH * 2
        row["varlen_tb_per_s"] = round(kv_bytes / row["varlen_us"] / 1e6, 2)
        emit(row)


def sweep(name, rows, gen, configs) -> None:
    from actors.model.kernels.paged_attention import POLICY, LaunchConfig, varlen_paged_attention

    q, kv, batch, flops = make_step(rows, gen)
    args = (q, kv.k[0], kv.v[0], batch.block_tables, batch.query_start, batch.context_lens, DH**-0.5)
    default = POLICY.config(q.shape[0], 8, 8192, torch.bfloat16)
    row = {"kernel": name, "tokens": int(q.shape[0]), "seqs": len(rows), "gflop": round(flops / 1e9, 2),
           "default": default.__dict__}
    row["default_us"] = round(graph_us(lambda: varlen_paged_attention(*args, max_context=8192)), 1)
    row["default_tflops"] = round(flops / row["default_us"] / 1e6, 1)
    if sum(c for _, c in rows) * len(rows) < 40_000_000:  # the dense gather must fit
        row["sdpa_us"] = round(sdpa_us(q, kv, batch), 1)
    for bm, tn, w, st in configs:
        cfg = LaunchConfig(bm, tn, 1, 256, w, st)
        try:
            us = graph_us(lambda: varlen_paged_attention(*args, max_context=8192, config=cfg))
            row[f"m{bm}_n{tn}_w{w}_s{st}_us"] = round(us, 1)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
            row[f"m{bm}_n{tn}_w{w}_s{st}_us"] = type(e).__name__
    emit(row)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    OUT = Path(args.out) if args.out else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    decode([(1, 48), (1, 1024), (1, 4096), (32, 1024), (128, 1024), (256, 1280)], gen)
    configs = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
    sweep("prefill_8x2048", [(2048, 2048)] * 8, gen, configs)
    sweep("prefill_1x1024", [(1024, 1024)], gen, configs)
    sweep("mixed_128dec_1024ctx+256", [(1, 1024)] * 128 + [(256, 256)], gen, configs[:3])
    sweep("mixed_256dec_1280ctx+1024", [(1, 1280)] * 256 + [(1024, 1024)], gen, configs[:3])


if __name__ == "__main__":
    main()
