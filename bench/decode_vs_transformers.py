"""Single-process decode: this engine vs transformers `generate`, same weights, same run, with each
engine step's share of the HBM roofline, kernel counts and prefill throughput.

A Qwen3-MoE-shaped checkpoint (transformers has no MoGE class) is built with random weights, saved in
HF format and loaded by both. Presets (random weights made on the device, no disk) run in this
engine alone: `bench-moge` (MoGE routing) and `qwen3-30b-a3b` (the full 48-layer shape).
Decode rate = B * (N - 1) / (t(N) - t(1)) for both sides: prefill and start-up are subtracted.

Engine systems, all on one loaded model: `graphs` (CUDA-graph decode, fused kernels: the default),
`eager` (fused kernels, no graphs), `unfused` (no graphs, plain torch ops: the engine before them).

Roofline: bytes a decode step must read (non-expert weights incl. the LM head, the routed experts the
step actually hits — counted per layer in an eager replay of the same requests —, the KV cache read
and written) over the device-to-device copy bandwidth measured at the start of the run, divided by
the measured step time.

  python bench/decode_vs_transformers.py --device cpu --dtype float32 --shape cpu --batch-sizes 1,8,32
  python bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --shape gpu --batch-sizes 1,32,128 \\
      --systems graphs,eager,unfused,transformers --preset bench-moge:1,32,128 --profile-batches 1,128
  python bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --systems graphs \\
      --preset qwen3-30b-a3b:1,256 --prefill 2048x8
Prints one JSON line per measurement (and appends them to --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.device import synchronize  # noqa: E402
from actors.engine.build import EngineSettings, LoadSpec, build_engine  # noqa: E402
from actors.engine.sampling_params import SamplingParams  # noqa: E402
from actors.model import kernels  # noqa: E402

# Qwen3-30B-A3B per-layer shape (hidden 2048, 128 experts, top-8, expert width 768), fewer layers.
SHAPES = {
    "gpu": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                num_hidden_layers=12, vocab_size=151936),
    "cpu": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_experts=32,
                num_experts_per_tok=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                num_hidden_layers=4, vocab_size=8192),
}
PROMPT_LEN = 16
OUT: Path | None = None


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(line + "\n")


def build_checkpoint(shape: str, dtype: torch.dtype, out: Path, device: str):
    """-> (checkpoint directory, the transformers model it was saved from, on `device`). Random init
    runs on the device (seconds for the 12-layer shape, minutes on a CPU)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**SHAPES[shape], max_position_embeddings=4096, norm_topk_prob=True,
                         tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
    with torch.device(device):
        model = Qwen3MoeForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    return out, model.eval()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n / best


def make_engine(source: str, device: str, dtype: str, max_batch: int, max_tokens_step: int):
    load = LoadSpec(source=source, dtype=dtype, device=device, max_model_len=4096)
    settings = EngineSettings(max_num_seqs=max_batch, max_num_batched_tokens=max_tokens_step)
    started = time.perf_counter()
    engine, _ = build_engine(load, settings)
    graphs = engine.runner.graphs
    emit({"event": "engine_built", "source": source, "seconds": round(time.perf_counter() - started, 1),
          "graph_sizes": sorted(graphs.graphs) if graphs else [],
          "graph_memory_mib": round(graphs.memory_bytes / 2**20) if graphs else 0})
    return engine


class EngineSystem:
    """One of graphs / eager / unfused on a built engine."""

    def __init__(self, engine, system: str) -> None:
        self.engine, self.system = engine, system

    def __enter__(self):
        from actors.model.local_experts import LocalExperts

        model = self.engine.runner.model
        self.saved, self.saved_experts = self.engine.runner.graphs, model.experts
        if self.system != "graphs":
            self.engine.runner.graphs = None
        kernels.set_enabled(self.system != "unfused")
        if self.system == "unfused":  # the model and its experts choose their kernels once: again
            model.experts = LocalExperts(model.cfg, self.saved_experts.groups)
            model.choose_kernels()
        return self

    def __exit__(self, *exc):
        self.engine.runner.graphs = self.saved
        self.engine.runner.model.experts = self.saved_experts
        kernels.set_enabled(True)
        self.engine.runner.model.choose_kernels()


def runner_for(engine, batch: int, prompt_len: int = PROMPT_LEN):
    runs = iter(range(1 << 30))

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        r = next(runs)
        for i in range(batch):
            engine.add_request(f"r{r}-{i}", [(7 * i + j) % 200 + 3 for j in range(prompt_len)], params)
        synchronize(engine.runner.device)
        t0 = time.perf_counter()
        engine.run_to_completion()
        synchronize(engine.runner.device)
        return time.perf_counter() - t0

    return run


def decode_rate(run, batch: int, new_tokens: int) -> float:
    """Best of three for each length: the first runs pay for warm-up."""
    run(4)
    t1 = min(run(1) for _ in range(3))
    tn = min(run(new_tokens) for _ in range(3))
    return batch * (new_tokens - 1) / (tn - t1)


def expert_hits(engine, batch: int, new_tokens: int) -> float:
    """Distinct routed experts per decode step, summed over layers: the same requests replayed
    eagerly (same tokens, so the same routing) with the dispatches recorded."""
    experts = engine.model.experts
    plain = experts.dispatch
    hits: dict[int, list[int]] = {}

    def recording(layer, x, ids, w):
        if ids.shape[0] == batch:  # decode steps only (prefill has batch * PROMPT_LEN rows)
            hits.setdefault(layer, []).append(int(torch.unique(ids).numel()))
        return plain(layer, x, ids, w)

    experts.dispatch = recording
    try:
        with EngineSystem(engine, "eager"):
            runner_for(engine, batch)(new_tokens)
    finally:
        del experts.dispatch
    return sum(sum(v) / len(v) for v in hits.values())


def step_bytes(engine, batch: int, hits: float, context: float) -> dict:
    model, cfg = engine.model, engine.cfg
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # all but the routed experts
    if not cfg.tie_word_embeddings:  # the embedding table is gathered, not read
        weights += batch * cfg.hidden_size * elem - model.embed_tokens.weight.numel() * elem
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * elem
    kv_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem
    parts = {"weights": weights, "experts": hits * expert, "kv": batch * (context + 1) * kv_token}
    parts["total"] = sum(parts.values())
    return parts


def profile(engine, batch: int, steps: int = 5) -> dict:
    """Kernels per decode step and GPU-busy time (union of kernel intervals) from torch.profiler."""
    from torch.profiler import DeviceType, ProfilerActivity
    from torch.profiler import profile as torch_profile

    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{i}", [(7 * i + j) % 200 + 3 for j in range(PROMPT_LEN)], params)
    for _ in range(3):  # prefill, then decode
        engine.step()
    synchronize(engine.runner.device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(engine.runner.device)
        wall = time.perf_counter() - t0
    for rid in engine.unfinished_request_ids():
        engine.abort_request(rid)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return {"kernels_per_step": round(len(spans) / steps, 1), "gpu_busy_ms_per_step": round(busy / steps / 1000, 3),
            "profiled_step_ms": round(1000 * wall / steps, 3)}


def prefill_rate(engine, prompt_len: int, batch: int) -> float:
    """Prompt tokens/s of `batch` distinct prompts (fresh random ids every run) with the prefix cache
    off: every token is computed (timing prompts already in the cache measured the cache)."""
    gen = torch.Generator().manual_seed(prompt_len * batch)
    runs = iter(range(1 << 30))
    caching, engine.blocks.enable_prefix_caching = engine.blocks.enable_prefix_caching, False

    def run() -> float:
        r = next(runs)
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"pf{r}-{i}", torch.randint(3, 203, (prompt_len,), generator=gen).tolist(), params)
        synchronize(engine.runner.device)
        t0 = time.perf_counter()
        engine.run_to_completion()
        synchronize(engine.runner.device)
        return time.perf_counter() - t0

    try:
        run()
        return batch * prompt_len / min(run() for _ in range(3))
    finally:
        engine.blocks.enable_prefix_caching = caching


def bench_engine(label, source, args, batches, bw, systems) -> None:
    engine = make_engine(source, args.device, args.dtype, max(batches),
                         max(2048, max(batches) * PROMPT_LEN, args.prefill_batch * args.prefill_len))
    for b in batches:
        for system in systems:
            with EngineSystem(engine, system):
                rate = decode_rate(runner_for(engine, b), b, args.new_tokens)
            row = {"model": label, "system": f"engine-{system}", "batch": b,
                   "tokens_per_s": round(rate, 1), "step_ms": round(1000 * b / rate, 3)}
            if system == "graphs" and bw:
                hits = expert_hits(engine, b, args.new_tokens)
                parts = step_bytes(engine, b, hits, PROMPT_LEN + args.new_tokens / 2)
                floor_ms = 1000 * parts["total"] / bw
                row.update(expert_hits_per_step=round(hits, 1), step_bytes_mb=round(parts["total"] / 1e6, 1),
                           bytes_mb={k: round(v / 1e6, 1) for k, v in parts.items() if k != "total"},
                           roofline_ms=round(floor_ms, 3), roofline_share=round(floor_ms / row["step_ms"], 3))
            emit(row)
        if b in args.profile_batches:
            for system in systems:
                if system in ("graphs", "unfused"):
                    with EngineSystem(engine, system):
                        emit({"model": label, "system": f"engine-{system}", "batch": b, "profile": profile(engine, b)})
    if args.prefill_len:
        rate = prefill_rate(engine, args.prefill_len, args.prefill_batch)
        emit({"model": label, "system": "engine", "prefill_tokens": args.prefill_len,
              "prefill_batch": args.prefill_batch, "prefill_tokens_per_s": round(rate)})
    del engine
    torch.cuda.empty_cache() if args.device == "cuda" else None


def time_transformers(model, device: str, batch: int, new_tokens: int) -> float:
    ids = torch.tensor([[(7 * i + j) % 200 + 3 for j in range(PROMPT_LEN)] for i in range(batch)], device=device)

    def run(n: int) -> float:
        synchronize(torch.device(device))
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        synchronize(torch.device(device))
        return time.perf_counter() - t0

    return decode_rate(run, batch, new_tokens)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default="", choices=["", *sorted(SHAPES)], help="checkpoint shape for the comparison")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--systems", default="graphs,transformers", help="graphs,eager,unfused,transformers")
    ap.add_argument("--preset", action="append", default=[], help="NAME:B1,B2 engine-only preset runs")
    ap.add_argument("--moge-preset", default="", help="also time this MoGE preset at --batch-sizes")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--profile-batches", default="")
    ap.add_argument("--prefill", default="", help="LENxBATCH, e.g. 2048x8: prefill throughput")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    OUT = Path(args.out) if args.out else None
    if args.threads:
        torch.set_num_threads(args.threads)
    args.profile_batches = {int(b) for b in args.profile_batches.split(",") if b}
    args.prefill_len, args.prefill_batch = (int(x) for x in args.prefill.split("x")) if args.prefill else (0, 1)
    systems = [s for s in args.systems.split(",") if s]
    engine_systems = [s for s in systems if s != "transformers"]
    if args.device == "cpu":
        engine_systems = [s if s != "graphs" else "eager" for s in engine_systems]
    tdtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    emit({"event": "copy_bandwidth", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
          "gb_per_s": round(bw / 1e9, 1)})
    batches = [int(b) for b in args.batch_sizes.split(",")]
    presets = [p.split(":") for p in args.preset]
    if args.moge_preset:
        presets.append((args.moge_preset, args.batch_sizes))
    if args.shape:
        shm = Path("/dev/shm")
        with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
            started = time.perf_counter()
            ckpt, hf_model = build_checkpoint(args.shape, tdtype, Path(tmp) / f"qwen3moe-{args.shape}", args.device)
            emit({"event": "checkpoint_built", "seconds": round(time.perf_counter() - started, 1)})
            label = f"qwen3moe-{args.shape}"
            if engine_systems:
                bench_engine(label, str(ckpt), args, batches, bw, engine_systems)
            if "transformers" in systems:
                for b in batches:
                    rate = time_transformers(hf_model, args.device, b, args.new_tokens)
                    emit({"model": label, "system": "transformers-generate", "batch": b,
                          "tokens_per_s": round(rate, 1), "step_ms": round(1000 * b / rate, 3)})
            del hf_model
    for name, sizes in presets:
        bench_engine(name, f"preset:{name}", args, [int(b) for b in sizes.split(",")], bw, engine_systems)


if __name__ == "__main__":
    main()
