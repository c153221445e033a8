"""Device time of the fused kernels against the torch code they replace (CUDA only), each timed as a
CUDA-graph replay (no launch gaps) with triton.testing.do_bench (median, L2 flushed between runs).

  python bench/kernel_check.py --out kernels.jsonl

- routed experts, Qwen3-30B-A3B layer shape (D 2048, 128 experts of width 768, top-8): the GEMV path
  and the grouped-matmul path of actors/model/kernels/moe.py and LocalExperts' torch path, per token
  count, with the bytes of the experts hit over the time;
- paged decode attention (Triton) against the SDPA path, per batch and context length;
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


def attention(cases) -> None:
    from actors.model.attention import paged_attention, plan_attention
    from actors.model.kernels.paged_decode import paged_decode_attention
    from actors.model.kv_cache import PagedKVCache
    from actors.model.step_batch import StepBatch

    gen = torch.Generator(device="cuda").manual_seed(1)
    for b, ctx in cases:
        bs, width = 16, -(-ctx // 16)
        kv = PagedKVCache(1, b * width, bs, 4, 128, torch.bfloat16, "cuda")
        kv.k[0].normal_(generator=gen)
        kv.v[0].normal_(generator=gen)
        tables = torch.randperm(b * width, device="cuda", generator=gen).view(b, width)
        lens = torch.full((b,), ctx, device="cuda")
        q = torch.randn(b, 32, 128, device="cuda", generator=gen).bfloat16()
        batch = StepBatch(torch.zeros(b, dtype=torch.long, device="cuda"), lens - 1, torch.arange(b + 1, device="cuda"),
                          lens, tables, torch.zeros(b, dtype=torch.long, device="cuda"), torch.arange(b, device="cuda"))

        class Step:
            plan = plan_attention(batch, bs)

        triton_us = graph_time_us(lambda: paged_decode_attention(q, kv.k[0], kv.v[0], tables, lens, 128**-0.5))
        kernels.set_enabled(False)
        try:
            sdpa_us = graph_time_us(lambda: paged_attention(q, 0, batch, kv, Step, 128**-0.5))
        finally:
            kernels.set_enabled(True)
        kv_bytes = b * ctx * 2 * 4 * 128 * 2
        emit({"kernel": "paged_decode", "batch": b, "context": ctx, "triton_us": round(triton_us, 1),
              "sdpa_us": round(sdpa_us, 1), "triton_tb_per_s": round(kv_bytes / triton_us / 1e6, 2)})


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
        attention([(1, 48), (32, 48), (128, 48), (1, 2048), (32, 2048)])
    if "norms" not in skip:
        norms([1, 128])


if __name__ == "__main__":
    main()
