"""`engine.batch_invariant`: what it costs and what it fixes, default vs invariant in the same run,
on one loaded model (two engines share the weights; each captures its own decode graphs).

- cost: decode rate at the given batch sizes (B * (N - 1) / (t(N) - t(1)), best of three, as
  bench/decode_vs_transformers.py), and, last, one prompt's prefill time;
- the issue's check: a 40-, 300- and 1,500-token prompt (greedy, --check-new tokens) alone, then
  in one batch with the two others, then beside 7, 31 and 100 other requests of other lengths:
  the first generated token that differs from the prompt's run alone (-1: none), per mode.

  python bench/batch_invariance.py --preset bench-moge --batches 1,32,128
  python bench/batch_invariance.py --preset qwen3-12-layers --batches 1,32,128      # Qwen3-30B-A3B, 12 layers
  python bench/batch_invariance.py --preset tiny-moge --device cpu --dtype float32 --batches 1,8,32 --check-new 16 \
      --threads 1 --cpu-time      # a shared CPU: process time, one thread
  python bench/batch_invariance.py --table out1.jsonl out2.jsonl                    # the short table
Prints one JSON line per measurement (and appends them to --out).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from actors.device import synchronize  # noqa: E402
from actors.engine.engine import EngineSpec, LLMEngine  # noqa: E402
from actors.engine.sampling_params import SamplingParams  # noqa: E402
from actors.model import presets  # noqa: E402
from actors.weights.loader import load_model  # noqa: E402
import decode_vs_transformers  # noqa: E402
from decode_vs_transformers import decode_rate, emit, runner_for  # noqa: E402


def register_presets() -> None:
    """qwen3-12-layers: Qwen3-30B-A3B's layer shape, 12 layers (the 12-layer shape of the GPU bench)."""
    presets.PRESETS.setdefault("qwen3-12-layers", replace(presets.get_preset("qwen3-30b-a3b"), num_layers=12,
                                                          max_position_embeddings=4096))


def engines(loaded, max_batch: int, graphs: bool) -> dict[str, LLMEngine]:
    out = {}
    for mode in ("default", "invariant"):
        spec = EngineSpec(max_model_len=2048, num_kv_blocks=max(2048, max_batch * 24), block_size=16,
                          max_num_seqs=max(max_batch, 104), max_num_batched_tokens=2048, cuda_graphs=graphs,
                          batch_invariant=mode == "invariant")
        started = time.perf_counter()
        out[mode] = LLMEngine(loaded, spec)
        emit({"event": "engine_built", "mode": mode, "seconds": round(time.perf_counter() - started, 1)})
    return out


def generate(engine: LLMEngine, prompts: dict[str, list[int]], new: int) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    for rid, p in prompts.items():
        engine.add_request(rid, p, params)
    return engine.run_to_completion()


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), -1)


def check(engine: LLMEngine, vocab: int, new: int, lengths=(40, 300, 1500)) -> dict:
    rng = random.Random(0)
    targets = {f"t{n}": [rng.randrange(3, min(vocab, 250)) for _ in range(n)] for n in lengths}
    alone = {rid: generate(engine, {rid: p}, new)[rid] for rid, p in targets.items()}
    result = {"together": {rid: first_difference(out, alone[rid]) for rid, out in generate(engine, targets, new).items()}}
    for others in (7, 31, 100):
        crowd = {f"o{i}": [rng.randrange(3, min(vocab, 250)) for _ in range(rng.randrange(8, 700))] for i in range(others)}
        outs = generate(engine, {**crowd, **targets}, new)
        result[f"with_{others}"] = {rid: first_difference(outs[rid], alone[rid]) for rid in targets}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-moge")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--check-new", type=int, default=48)
    ap.add_argument("--prefill", type=int, default=1500, help="prompt tokens of the prefill-rate row (0: none)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time, not wall time (a CPU shared with other jobs)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--table", nargs="*", type=Path, help="print the short table of these result files and exit")
    args = ap.parse_args()
    if args.table is not None:
        return print_table(args.table)
    decode_vs_transformers.OUT = args.out  # where emit appends
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:  # the timers of decode_vs_transformers read time.perf_counter
        decode_vs_transformers.time = type("ProcessClock", (), {"perf_counter": staticmethod(time.process_time)})
    register_presets()
    torch.manual_seed(0)
    loaded = load_model(f"preset:{args.preset}", args.dtype, args.device)
    batches = [int(b) for b in args.batches.split(",")]
    pair = engines(loaded, max(batches), graphs=args.device == "cuda")
    label = args.preset
    for b in batches:
        for mode in ("default", "invariant"):  # alternating: drift hits both alike
            rate = decode_rate(runner_for(pair[mode], b), b, args.new_tokens)
            emit({"model": label, "mode": mode, "batch": b, "tokens_per_s": round(rate, 1),
                  "step_ms": round(1000 * b / rate, 3)})
    if not args.no_check:
        for mode in ("default", "invariant"):
            started = time.perf_counter()
            emit({"model": label, "mode": mode, "check": check(pair[mode], loaded.cfg.vocab_size, args.check_new),
                  "seconds": round(time.perf_counter() - started, 1)})
    if args.prefill:
        for mode in ("default", "invariant"):
            run = runner_for(pair[mode], 1, args.prefill)
            run(1)
            t = min(run(1) for _ in range(3))
            emit({"model": label, "mode": mode, "prefill_tokens": args.prefill, "prefill_s": round(t, 4)})
    synchronize(pair["default"].runner.device)


def print_table(files: list[Path]) -> None:
    rows = [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines() if line.strip()]
    rate = {(r["model"], r["mode"], r["batch"]): r for r in rows if "batch" in r}
    print("| model | batch | default step ms (tok/s) | invariant step ms (tok/s) | cost |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (model, mode, b), r in sorted(rate.items()):
        if mode != "default" or (model, "invariant", b) not in rate:
            continue
        inv = rate[(model, "invariant", b)]
        cost = inv["step_ms"] / r["step_ms"] - 1
        print(f"| {model} | {b} | {r['step_ms']} ({r['tokens_per_s']}) | {inv['step_ms']} ({inv['tokens_per_s']}) | {cost:+.1%} |")
    for r in rows:
        if "prefill_tokens" in r:
            print(f"prefill {r['model']} {r['mode']}: {r['prefill_tokens']} tokens in {r['prefill_s']} s")
    for r in rows:
        if "check" in r:
            print(f"first differing token {r['model']} {r['mode']}: {json.dumps(r['check'])}")


if __name__ == "__main__":
    main()
