"""Single-process decode throughput of the engine: one JSON line per batch size.

    python bench/engine_throughput.py --preset bench-moge --device cuda --dtype bfloat16 \\
        --batch-sizes 1,8,32,64 --steps 64

For each batch size B, B requests with --prompt-len random prompt tokens are prefilled, --warmup
decode steps run untimed, then --steps decode steps are timed (device synchronised at both ends).
tokens_per_s counts generated tokens only; step_ms is the mean wall time of one decode step,
including scheduling, StepBatch building, sampling and detokenization.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from actors.device import resolve_device, synchronize
from actors.engine.engine import EngineSpec, LLMEngine
from actors.weights.loader import load_model
from actors.engine.sampling_params import SamplingParams


def measure(loaded, batch: int, prompt_len: int, warmup: int, steps: int, block_size: int) -> dict:
    total = prompt_len + warmup + steps + 1
    spec = EngineSpec(
        max_model_len=total,
        num_kv_blocks=batch * -(-total // block_size),
        block_size=block_size,
        max_num_seqs=batch,
        max_num_batched_tokens=max(batch * prompt_len, 16),
    )
    engine = LLMEngine(loaded, spec)
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 1, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, min(256, loaded.cfg.vocab_size), (prompt_len,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompt, params)
    while engine.stats().tokens_generated < batch:  # prefill: everyone has its first token
        engine.step()
    for _ in range(warmup):
        engine.step()
    synchronize(engine.device)
    start_tokens = engine.stats().tokens_generated
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    synchronize(engine.device)
    elapsed = time.perf_counter() - t0
    generated = engine.stats().tokens_generated - start_tokens
    assert engine.stats().preemptions == 0 and generated == batch * steps
    return {"batch": batch, "tokens_per_s": round(generated / elapsed, 1), "step_ms": round(elapsed / steps * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moge")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()

    device = resolve_device(args.device)
    loaded = load_model(f"preset:{args.preset}", args.dtype, device)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        row = measure(loaded, batch, args.prompt_len, args.warmup, args.steps, args.block_size)
        row.update(preset=args.preset, device=str(device), dtype=str(loaded.dtype).removeprefix("torch."))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
