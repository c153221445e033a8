"""Single-process decode throughput: this engine vs transformers `generate`, same weights, same run.

A Qwen3-MoE-shaped checkpoint (transformers has no MoGE class) is built with random weights, saved in
HF format and loaded by both. The MoGE benchmark preset runs in this engine alone (no peer exists).
Decode rate = B * (N - 1) / (t(N) - t(1)) for both sides: prefill and start-up are subtracted.

  python bench/decode_vs_transformers.py --device cpu --dtype float32 --shape cpu --batch-sizes 1,8,32
  python bench/decode_vs_transformers.py --device cuda --dtype bfloat16 --shape gpu --batch-sizes 1,8,32,128
Prints one JSON line per (system, batch size).
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
from actors.engine.sampling_params import SamplingParams  # noqa: E402
from cluster.serve.replica_engine import build_engine  # noqa: E402
from cluster.config import MogeConfig  # noqa: E402

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


def build_checkpoint(shape: str, dtype: torch.dtype, out: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**SHAPES[shape], max_position_embeddings=4096, norm_topk_prob=True,
                         tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    return out


def time_engine(source: str, device: str, dtype: str, batch: int, new_tokens: int) -> float:
    cfg = MogeConfig.load(model={"source": source, "device": device, "dtype": dtype},
                          engine={"max_num_seqs": batch, "max_num_batched_tokens": max(2048, batch * PROMPT_LEN)})
    engine, _ = build_engine(cfg)

    runs = iter(range(1 << 30))

    def run(n: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        r = next(runs)
        for i in range(batch):
            engine.add_request(f"r{r}-{i}", [(7 * i + j) % 200 + 3 for j in range(PROMPT_LEN)], params)
        synchronize(engine.device)
        t0 = time.perf_counter()
        engine.run_to_completion()
        synchronize(engine.device)
        return time.perf_counter() - t0

    return _decode_rate(run, batch, new_tokens)


def _decode_rate(run, batch: int, new_tokens: int) -> float:
    """Best of three for each length: the machine is shared and the first runs pay for warm-up."""
    run(4)
    t1 = min(run(1) for _ in range(3))
    tn = min(run(new_tokens) for _ in range(3))
    return batch * (new_tokens - 1) / (tn - t1)


def time_transformers(path: Path, device: str, dtype: torch.dtype, batch: int, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor([[(7 * i + j) % 200 + 3 for j in range(PROMPT_LEN)] for i in range(batch)], device=device)

    def run(n: int) -> float:
        synchronize(torch.device(device))
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        synchronize(torch.device(device))
        return time.perf_counter() - t0

    return _decode_rate(run, batch, new_tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--moge-preset", default="", help="also time this MoGE preset in the engine alone")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tdtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.shape, tdtype, Path(tmp) / f"qwen3moe-{args.shape}")
        for b in batches:
            for system, fn in (
                ("moge-engine", lambda: time_engine(str(ckpt), args.device, args.dtype, b, args.new_tokens)),
                ("transformers-generate", lambda: time_transformers(ckpt, args.device, tdtype, b, args.new_tokens)),
            ):
                rate = fn()
                print(json.dumps({"model": f"qwen3moe-{args.shape}", "system": system, "batch": b,
                                  "tokens_per_s": round(rate, 1), "step_ms": round(1000 * b / rate, 2)}), flush=True)
            if args.moge_preset:
                rate = time_engine(f"preset:{args.moge_preset}", args.device, args.dtype, b, args.new_tokens)
                print(json.dumps({"model": args.moge_preset, "system": "moge-engine", "batch": b,
                                  "tokens_per_s": round(rate, 1), "step_ms": round(1000 * b / rate, 2)}), flush=True)


if __name__ == "__main__":
    main()
