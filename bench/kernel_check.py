"""Device time of the fused kernels against the torch code they replace (CUDA only), each timed as a
CUDA-graph replay (no launch gaps) with triton.testing.do_bench (median, L2 flushed between runs).

  python bench/kernel_check.py --out kernels.jsonl

- routed experts, Qwen3-30B-A3B layer shape (D 2048, 128 experts of width 768, top-8): the GEMV path
  and the grouped-matmul path of actors/model/kernels/moe.py and LocalExperts' torch path, per token
  count, with the bytes of the experts hit over the time;
- varlen paged attention (Triton) against the SDPA path: decode steps per batch and context, prefill
  and mixed steps with a sweep of launch configurations;
- add + RMSNorm: Triton against torch ops and against torch.compile of the same torch code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.model import kernels  # noqa: E402

OUT: Path | None = None


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


def graph_time_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return 1000 * do_bench(graph.replay, warmup=20, rep=100, return_mode="median")


def experts(tokens_list) -> None:
    from actors.model.config import ModelConfig
    from actors.model.local_experts import LocalExperts
    from actors.model.kernels.moe import fused_moe
    from actors.weights.loader import random_expert_groups

    cfg = ModelConfig(family="qwen3_moe", vocab_size=16, hidden_size=2048, num_layers=1, num_heads=16,
                      num_kv_heads=4, head_dim=128, n_experts=128, n_groups=8, top_k=8,
                      moe_intermediate_size=768, renormalize=True, qk_norm=True)
    local = LocalExperts(cfg, random_expert_groups(cfg, range(8), 0, torch.bfloat16, "cuda"))
    w13, w2 = local.compute.stacked[0]
    expert_bytes = 3 * 2048 * 768 * 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t in tokens_list:
        x = torch.randn(t, 2048, device="cuda", generator=gen).bfloat16()
        logits = torch.randn(t, 128, device="cuda", generator=gen)
        w, ids = torch.topk(torch.softmax(logits, -1), 8)
        hit = int(torch.unique(ids).numel())
        row = {"kernel": "routed_experts", "tokens": t, "experts_hit": hit}
        for name, fn in (
            ("gemv", lambda: fused_moe(x, w13, w2, ids, w, 16, 8, gemv_max_tokens=1 << 20)),
            ("grouped", lambda: fused_moe(x, w13, w2, ids, w, 16, 8, gemv_max_tokens=0)),
        ):
            us = graph_time_us(fn)
            row[f"{name}_us"] = round(us, 1)
            row[f"{name}_tb_per_s"] = round(hit * expert_bytes / us / 1e6, 2)
        kernels.set_enabled(False)  # the torch path is chosen when experts are built, so build one
        try:
            plain = LocalExperts(cfg, local.groups)
            row["torch_us"] = round(graph_time_us(lambda: plain.dispatch(0, x, ids, w).wait()), 1)
        finally:
            kernels.set_enabled(True)
        emit(row)


HEADS, KV_HEADS, DH, BS = 32, 4, 128, 16  # the Qwen3-30B-A3B attention shape, block 16


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
        return graph_time_us(lambda: paged_attention(q, 0, batch, kv, Step, DH**-0.5))
    finally:
        kernels.set_enabled(True)


def decode(cases, gen) -> None:
    from actors.model.kernels.paged_attention import POLICY, LaunchConfig, varlen_paged_attention

    for b, ctx in cases:
        q, kv, batch, _ = make_step([(1, ctx)] * b, gen)
        args = (q, kv.k[0], kv.v[0], batch.block_tables, batch.query_start, batch.context_lens, DH**-0.5)
        row = {"kernel": "decode", "batch": b, "context": ctx,
               "varlen_us": round(graph_time_us(lambda: varlen_paged_attention(*args, max_context=4096)), 1),
               "sdpa_us": round(sdpa_us(q, kv, batch), 1),
               "policy": POLICY.config(b, 8, 4096, torch.bfloat16).__dict__}
        if b <= 8:  # the split size the small-launch rule replaced
            cfg = LaunchConfig(16, 64, 16, 256, 4, 2)
            row["varlen_split256_us"] = round(graph_time_us(lambda: varlen_paged_attention(*args, max_context=4096, config=cfg)), 1)
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
    row["default_us"] = round(graph_time_us(lambda: varlen_paged_attention(*args, max_context=8192)), 1)
    row["default_tflops"] = round(flops / row["default_us"] / 1e6, 1)
    if sum(c for _, c in rows) * len(rows) < 40_000_000:  # the dense gather must fit
        row["sdpa_us"] = round(sdpa_us(q, kv, batch), 1)
    for bm, tn, w, st in configs:
        cfg = LaunchConfig(bm, tn, 1, 256, w, st)
        try:
            us = graph_time_us(lambda: varlen_paged_attention(*args, max_context=8192, config=cfg))
            row[f"m{bm}_n{tn}_w{w}_s{st}_us"] = round(us, 1)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
            row[f"m{bm}_n{tn}_w{w}_s{st}_us"] = type(e).__name__
    emit(row)


def attention() -> None:
    """Varlen paged attention: decode steps, then prefill and mixed steps with a sweep of launch
    configurations (TFLOP/s = causal attention FLOPs over the time); SDPA path = the dense gather
    and masked SDPA the kernel replaced."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    decode([(1, 48), (1, 1024), (1, 4096), (32, 1024), (128, 1024), (256, 1280)], gen)
    configs = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
    sweep("prefill_8x2048", [(2048, 2048)] * 8, gen, configs)
    sweep("prefill_1x1024", [(1024, 1024)], gen, configs)
    sweep("mixed_128dec_1024ctx+256", [(1, 1024)] * 128 + [(256, 256)], gen, configs[:3])
    sweep("mixed_256dec_1280ctx+1024", [(1, 1280)] * 256 + [(1024, 1024)], gen, configs[:3])


def norms(rows_list) -> None:
    from actors.model.kernels.norm import add_rms_norm

    def torch_add_norm(h, d, w):
        h = h + d
        xf = h.float()
        return h, w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)

    started = time.perf_counter()
    compiled = torch.compile(torch_add_norm, dynamic=False)
    for rows in rows_list:
        h, d = torch.randn(rows, 2048, device="cuda").bfloat16(), torch.randn(rows, 2048, device="cuda").bfloat16()
        w = torch.randn(2048, device="cuda").bfloat16()
        row = {"kernel": "add_rms_norm", "rows": rows,
               "triton_us": round(graph_time_us(lambda: add_rms_norm(h, d, w, 1e-6)), 2),
               "torch_us": round(graph_time_us(lambda: torch_add_norm(h, d, w)), 2)}
        t0 = time.perf_counter()
        compiled(h, d, w)
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["torch_compile_us"] = round(graph_time_us(lambda: compiled(h, d, w)), 2)
        emit(row)
    emit({"kernel": "add_rms_norm", "torch_compile_total_s": round(time.perf_counter() - started, 1)})


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--skip", default="", help="comma list of experts,attention,norms")
    args = ap.parse_args()
    OUT = Path(args.out) if args.out else None
    skip = set(args.skip.split(","))
    if "experts" not in skip:
        experts([int(t) for t in args.tokens.split(",")])
    if "attention" not in skip:
        attention()
    if "norms" not in skip:
        norms([1, 128])


if __name__ == "__main__":
    main()
