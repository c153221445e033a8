"""Host time of the output side per decode step: the step thread with and without making the text.

    python bench/output_path.py --preset tiny-moge --batch 32 --steps 64 --repeats 5

B requests with stop strings (held-back text is the costly case) are prefilled, then --steps
decode steps are timed twice on fresh engines: `make_text` on (the step thread detokenises and
applies stop strings, as every step did before the async engine moved that work out) and off (what
AsyncEngine runs: token ids only; each stream makes its text on the consumer's event loop). The
difference is what the step thread no longer spends (wall and process CPU time per step; CPU time
is the steadier figure on a shared machine); `text_us_per_token` is what the consumer side spends
instead (TextStream.apply on the same outputs). Median of --repeats; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from actors.device import synchronize
from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.output.text_stream import TextStream
from actors.engine.sampling_params import SamplingParams
from actors.weights.loader import load_model

STOPS = ["\n\n", "###", "</answer>"]  # never produced in practice, but every tail is checked against them


def decode_steps(loaded, batch: int, prompt_len: int, steps: int, make_text: bool):
    """(wall seconds, process CPU seconds) per timed decode step, and the outputs of those steps."""
    total = prompt_len + steps + 2
    spec = EngineSpec(max_model_len=total, num_kv_blocks=batch * -(-total // 16), block_size=16,
                      max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len)
    engine = LLMEngine(loaded, spec)
    engine.make_text = make_text
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True, stop=STOPS)
    prompts = {}
    for i in range(batch):
        prompts[f"r{i}"] = torch.randint(0, min(256, loaded.cfg.vocab_size), (prompt_len,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompts[f"r{i}"], params)
    while engine.stats().tokens_generated < batch:
        engine.step()
    synchronize(engine.runner.device)
    outputs = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        outputs.append(engine.step())
    synchronize(engine.runner.device)
    return ((time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps), outputs, prompts, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moge")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: a shared CPU makes spinning OpenMP threads cost 20x)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(f"preset:{args.preset}", args.dtype, args.device)
    on, off, text = [], [], []
    for _ in range(args.repeats):  # interleaved, so load from elsewhere hits both alike
        on.append(decode_steps(loaded, args.batch, args.prompt_len, args.steps, True)[0])
        seconds, outputs, prompts, params = decode_steps(loaded, args.batch, args.prompt_len, args.steps, False)
        off.append(seconds)
        streams = {rid: TextStream(loaded.tokenizer, p, params) for rid, p in prompts.items()}
        t0 = time.perf_counter()
        for step in outputs:
            for out in step:
                streams[out.request_id].apply(out)
        text.append((time.perf_counter() - t0) / sum(len(s) for s in outputs))

    def ms(runs, i):
        return statistics.median(r[i] for r in runs) * 1e3

    on_ms, off_ms, on_cpu, off_cpu = ms(on, 0), ms(off, 0), ms(on, 1), ms(off, 1)
    print(json.dumps({
        "preset": args.preset, "device": args.device, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads,
        "step_ms_text_on_step_thread": round(on_ms, 3), "step_ms_token_ids_only": round(off_ms, 3),
        "saved_ms_per_step": round(on_ms - off_ms, 3), "saved_fraction": round(1 - off_ms / on_ms, 3),
        "cpu_ms_text_on_step_thread": round(on_cpu, 3), "cpu_ms_token_ids_only": round(off_cpu, 3),
        "text_us_per_token": round(statistics.median(text) * 1e6, 2),
    }))


if __name__ == "__main__":
    main()
