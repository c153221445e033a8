"""Decode-step time of a preset in FP8 or bf16 on one GPU, at given batch sizes and context lengths,
with the share of the HBM roofline; and the routed-expert kernels' read bandwidth.

Model level: the model's forward over a decode StepBatch (one new token per sequence at position
`context`, each sequence's blocks its own), captured in a CUDA graph and replayed (no scheduler, no
sampling: both sides of a comparison measured the same way, in the same run). The KV cache is
allocated for the largest batch of a context and left zero: attention reads every byte of it all the
same. tokens/s = batch / step time; TPOT at batch 1 = step time.

Roofline: bytes a step must read (the attention part's weights without the embedding table, the
routed experts the step hits — counted per layer from the routing of an eager pass over the same
batch —, the KV read and written) over the device-to-device copy bandwidth measured at the start of
the run, divided by the measured step time.

  python bench/fp8_decode.py --preset pangu-pro-moe-72b --runs fp8,none:24 --batches 1,64,128,0 \\
      --contexts 2048,16 --kernels 1,16,64,128 --out pangu.jsonl
  python bench/fp8_decode.py --preset bench-moge --runs fp8:2 --device cpu --dtype float32 --batches 1,4 --contexts 16
  python bench/fp8_decode.py --summary DIR      # the table of every *.jsonl in DIR
Prints one JSON line per measurement (and appends them to --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.device import memory_free, synchronize  # noqa: E402
from actors.model.kv_cache import PagedKVCache  # noqa: E402
from actors.model.presets import get_preset  # noqa: E402
from actors.model.quant.blocks import nbytes  # noqa: E402
from actors.model.step_batch import StepBatch  # noqa: E402
from actors.weights.loader import build_preset  # noqa: E402
import decode_vs_transformers as dvt  # noqa: E402  (copy_bandwidth, emit: the same JSON lines)
from decode_vs_transformers import copy_bandwidth, emit  # noqa: E402

BLOCK = 16


def decode_batch(batch: int, context: int, vocab: int, device, first_block: int = 0) -> StepBatch:
    """One new token per sequence at position `context`; sequence i owns blocks i*W .. (i+1)*W - 1."""
    width = -(-(context + 1) // BLOCK)
    tables = first_block + torch.arange(batch * width, device=device).view(batch, width)
    pos = torch.full((batch,), context, device=device)
    gen = torch.Generator(device=device).manual_seed(batch * 7919 + context)
    return StepBatch(
        input_ids=torch.randint(0, vocab, (batch,), device=device, generator=gen),
        positions=pos,
        query_start=torch.arange(batch + 1, device=device),
        context_lens=pos + 1,
        block_tables=tables,
        slot_mapping=tables[:, context // BLOCK] * BLOCK + context % BLOCK,
        logits_index=torch.arange(batch, device=device),
    )


def expert_hits(loaded, batch: StepBatch, kv) -> float:
    """Distinct routed experts per step, summed over layers, from one eager pass."""
    experts = loaded.model.experts
    plain = experts.dispatch
    hits = []

    def recording(layer, x, ids, w):
        hits.append(int(torch.unique(ids).numel()))
        return plain(layer, x, ids, w)

    experts.dispatch = recording
    try:
        loaded.model(batch, kv)
    finally:
        del experts.dispatch
    return float(sum(hits))


def step_bytes(loaded, batch: int, context: int, hits: float) -> dict:
    cfg, model = loaded.cfg, loaded.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cfg.tie_word_embeddings:  # the embedding table is gathered, not read
        emb = model.embed_tokens.weight
        weights += batch * cfg.hidden_size * emb.element_size() - emb.numel() * emb.element_size()
    group = next(iter(loaded.expert_groups.values()))
    layer = next(iter(group.w13))
    per_expert = (nbytes(group.w13[layer]) + nbytes(group.w2[layer])) / cfg.experts_per_group
    kv_elem = torch.empty((), dtype=loaded.dtype).element_size()
    kv_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * kv_elem
    parts = {"weights": weights, "experts": hits * per_expert, "kv": batch * (context + 1) * kv_token}
    parts["total"] = sum(parts.values())
    return parts


def time_step(fn, device, steps: int) -> float:
    """Seconds per call: a CUDA graph replay on CUDA (warm-up on a side stream first, as the engine's
    capture does), the eager call elsewhere."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000 / steps)
    del graph
    return best


def max_batch(loaded, context: int, fraction: float, reserve_bytes: int) -> int:
    width = -(-(context + 1) // BLOCK)
    per_seq = width * 2 * loaded.cfg.num_layers * BLOCK * loaded.cfg.num_kv_heads * loaded.cfg.head_dim * loaded.dtype.itemsize
    return max(1, int((memory_free(loaded.device) * fraction - reserve_bytes) // per_seq))


def bench_decode(loaded, label: str, args, bw: float) -> None:
    device = loaded.device
    for context in args.contexts:
        top = min(args.max_batch_cap, max_batch(loaded, context, args.kv_fraction, args.reserve_gb << 30))
        batches = sorted({min(top, b) if b > 0 else top for b in args.batches})
        width = -(-(context + 1) // BLOCK)
        kv = PagedKVCache.for_model(loaded.cfg, max(batches) * width, BLOCK, loaded.dtype, device)
        emit({"event": "kv_cache", "model": label, "context": context, "max_batch": top,
              "kv_gib": round(kv.nbytes / 2**30, 2), "free_gib_after": round(memory_free(device) / 2**30, 2)})
        for b in batches:
            batch = decode_batch(b, context, loaded.cfg.vocab_size, device)
            hits = expert_hits(loaded, batch, kv)
            seconds = time_step(lambda: loaded.model(batch, kv), device, args.steps)
            parts = step_bytes(loaded, b, context, hits)
            row = {"model": label, "quantization": loaded.quantization, "layers": loaded.cfg.num_layers,
                   "batch": b, "context": context, "step_ms": round(1000 * seconds, 3),
                   "tokens_per_s": round(b / seconds, 1), "expert_hits_per_step": hits,
                   "step_bytes_mb": round(parts["total"] / 1e6, 1),
                   "bytes_mb": {k: round(v / 1e6, 1) for k, v in parts.items() if k != "total"}}
            if bw:
                floor = parts["total"] / bw
                row.update(roofline_ms=round(1000 * floor, 3), roofline_share=round(floor / seconds, 3))
            emit(row)
        del kv
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_kernels(loaded, label: str, tokens_list, bw: float) -> None:
    """The routed experts of one layer (every group stacked, as LocalExperts runs them): each path's
    time and the bytes of the experts it hits over that time."""
    from actors.model.kernels import moe as kmoe

    cfg = loaded.cfg
    experts = loaded.model.experts
    stacked = experts.compute.stacked  # actors/model/group_compute.py: one stack per layer
    layer = next(iter(stacked))
    w13, w2 = stacked[layer]
    per_expert = (nbytes(w13) + nbytes(w2)) / w13.shape[0]
    gen = torch.Generator(device=loaded.device).manual_seed(0)
    fp8 = loaded.quantization == "fp8"
    for t in tokens_list:
        x = torch.randn(t, cfg.hidden_size, device=loaded.device, generator=gen).to(loaded.dtype)
        ids, w = loaded.model.route(layer, x)  # the model's router on random activations
        hit = int(torch.unique(ids).numel())
        eg, ng = cfg.experts_per_group, cfg.n_groups
        paths = {"gemv": lambda: kmoe.fused_moe(x, w13, w2, ids, w, eg, ng, gemv_max_tokens=1 << 20),
                 "grouped": lambda: kmoe.fused_moe(x, w13, w2, ids, w, eg, ng, gemv_max_tokens=0)}
        row = {"kernel": "routed_experts", "model": label, "quantization": loaded.quantization, "tokens": t, "experts_hit": hit}
        for name, fn in paths.items():
            if fp8 and name == "grouped" and t < 16:
                continue
            for backend in (("torch", "triton") if not fp8 and name == "grouped" else ("",)):
                if backend:  # read when the call launches (here: at capture)
                    os.environ["MOGE_GEMM_BF16_GROUPED"] = backend
                try:
                    us = 1e6 * time_step(fn, loaded.device, 20)
                finally:
                    os.environ.pop("MOGE_GEMM_BF16_GROUPED", None)
                key = name if fp8 or name == "gemv" else f"grouped_{backend}"
                row[f"{key}_us"] = round(us, 1)
                if bw:
                    row[f"{key}_copy_bw_share"] = round(hit * per_expert / (us / 1e6) / bw, 3)
        emit(row)


def summary(out_dir: Path) -> None:
    """A short table of every JSON line under out_dir."""
    rows = [json.loads(line) for f in sorted(out_dir.glob("*.jsonl")) for line in f.read_text().splitlines() if line.strip()]
    print("\n== decode steps (model forward in a CUDA graph) ==")
    print(f"{'model':<24}{'quant':<6}{'L':>3}{'batch':>6}{'ctx':>6}{'step ms':>10}{'tok/s':>10}{'roofline':>9}")
    for r in rows:
        if "step_ms" in r and "batch" in r:
            print(f"{r['model']:<24}{r['quantization']:<6}{r['layers']:>3}{r['batch']:>6}{r['context']:>6}"
                  f"{r['step_ms']:>10.3f}{r['tokens_per_s']:>10.1f}{r.get('roofline_share', float('nan')):>9.3f}")
    print("\n== routed experts, one layer (us; share of copy bandwidth) ==")
    for r in rows:
        if r.get("kernel") == "routed_experts":
            parts = [f"{k[:-3]} {r[k]} us ({r.get(k[:-3] + '_copy_bw_share', '-')})" for k in r if k.endswith("_us")]
            print(f"{r['model']:<24}{r['quantization']:<6}T={r['tokens']:<5} hit {r['experts_hit']:<4} " + "; ".join(parts))
    for r in rows:
        if r.get("event") in ("copy_bandwidth", "model_built") or "test" in r:
            print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="")
    ap.add_argument("--runs", default="none", help="comma list of QUANT[:LAYERS], e.g. fp8,none:24 (layers: "
                    "override the preset's count); run one after another in this process")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,64,128,0", help="0 = the largest the KV cache fits (capped)")
    ap.add_argument("--max-batch-cap", type=int, default=512)
    ap.add_argument("--contexts", default="2048,16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kv-fraction", type=float, default=0.85, help="of the memory free after the weights")
    ap.add_argument("--reserve-gb", type=int, default=6, help="kept free for activations and graphs")
    ap.add_argument("--kernels", default="", help="token counts for the routed-expert kernel timings")
    ap.add_argument("--out", default="")
    ap.add_argument("--summary", default="", help="print the table of the JSON lines in this directory and exit")
    args = ap.parse_args()
    if args.summary:
        summary(Path(args.summary))
        return
    dvt.OUT = Path(args.out) if args.out else None
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    device = torch.device(args.device)
    bw = copy_bandwidth(device) if device.type == "cuda" else 0.0
    if bw:
        emit({"event": "copy_bandwidth", "device": torch.cuda.get_device_name(), "gb_per_s": round(bw / 1e9, 1)})
    for run in args.runs.split(","):
        quantization, _, layers = run.partition(":")
        cfg = get_preset(args.preset)
        if layers:
            n = int(layers)
            cfg = replace(cfg, num_layers=n, dense_layers=tuple(l for l in cfg.dense_layers if l < n))
        label = args.preset if not layers else f"{args.preset}-{layers}L"
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        loaded = build_preset(cfg, label, f"preset:{args.preset}", 0, getattr(torch, args.dtype), device,
                              quantization=quantization)
        synchronize(device)
        emit({"event": "model_built", "model": label, "quantization": loaded.quantization,
              "seconds": round(time.perf_counter() - started, 1), "weights_gib": round(loaded.bytes_loaded / 2**30, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None})
        with torch.no_grad():
            bench_decode(loaded, label, args, bw)
            if args.kernels and device.type == "cuda":  # Triton on the device only
                bench_kernels(loaded, label, [int(t) for t in args.kernels.split(",")], bw)
        del loaded
        gc.collect()


if __name__ == "__main__":
    main()
