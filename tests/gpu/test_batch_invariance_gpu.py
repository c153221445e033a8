"""`engine.batch_invariant` on a CUDA device, bf16, CUDA graphs on: a request's logits bit-identical
alone, among 2..256 random other requests, with its prefix from the cache, and prefilled in one
chunk or many — for `bench-moge` and the 12-layer Qwen3-30B-A3B shape (random weights made on the
device). The op-level properties are tests/gpu/test_invariant_kernels.py.

    python -m pytest -q tests/gpu/test_batch_invariance_gpu.py
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MAX_NEW = 6
PROMPT = 300  # tokens of the request under test: 19 blocks of 16, more than one KV split


def qwen3_12_layers():
    from actors.model import presets

    return replace(presets.get_preset("qwen3-30b-a3b"), num_layers=12, max_position_embeddings=4096)


@pytest.fixture(scope="module", params=["bench-moge", "qwen3-12-layers"])
def engine(request):
    from actors.engine.engine import EngineSpec, LLMEngine
    from actors.model import presets
    from actors.weights.loader import load_model

    if request.param == "qwen3-12-layers":
        presets.PRESETS.setdefault("qwen3-12-layers", qwen3_12_layers())
    loaded = load_model(f"preset:{request.param}", "bfloat16", "cuda")
    spec = EngineSpec(max_model_len=1024, num_kv_blocks=256 * 40, block_size=16, max_num_seqs=256,
                      max_num_batched_tokens=1024, cuda_graphs=True, batch_invariant=True)
    eng = LLMEngine(loaded, spec)
    assert eng.runner.graphs is not None
    yield eng
    del eng, loaded
    torch.cuda.empty_cache()


def run(engine, arrivals: dict[int, list[tuple[str, list[int]]]], chunk: int | None = None,
        cache: bool = False) -> dict[str, dict[int, torch.Tensor]]:
    """Requests added at their step; -> the target's ("t") logits rows by position. One engine
    serves every case (graphs are captured once): the chunk budget and prefix caching are set per
    run, caching off unless asked, so no run reuses another's blocks."""
    from actors.engine.sampling_params import SamplingParams

    rows: dict[str, dict[int, torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording(scheduled, prompt_rows=None):
        logits, extra = execute(scheduled, prompt_rows)
        for i, (seq, n) in enumerate(zip(scheduled.seqs, scheduled.num_new_tokens)):
            if seq.num_computed_tokens + n == seq.num_tokens and seq.request_id == "t":
                rows.setdefault(seq.request_id, {})[seq.num_computed_tokens + n] = logits[i].clone()
        return logits, extra

    engine.runner.execute = recording
    budget = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = chunk or budget  # the chunk size is the scheduler's budget per step
    engine.blocks.enable_prefix_caching = cache
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    try:
        for step in range(10_000):
            for rid, prompt in arrivals.get(step, []):
                engine.add_request(rid, prompt, params)
            if not engine.has_unfinished() and step > max(arrivals):
                break
            engine.step()
    finally:
        engine.runner.execute = execute
        engine.scheduler.max_num_batched_tokens = budget
        engine.blocks.enable_prefix_caching = False
    assert not engine.has_unfinished()
    return rows


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


@pytest.fixture(scope="module")
def alone(engine):
    return run(engine, {0: [("t", prompt(1, PROMPT))]})["t"]


def same(got, want) -> list[int]:
    assert sorted(got) == sorted(want)
    return [p for p in want if not torch.equal(got[p], want[p])]


@pytest.mark.parametrize("others", [1, 31, 255])
def test_logits_alone_and_among_random_requests(engine, alone, others):
    rng = random.Random(others)
    arrivals: dict[int, list] = {}
    for i in range(others):  # arriving over the target's prefill and decode: every batch size in between
        arrivals.setdefault(rng.randrange(0, 6), []).append((f"o{i}", prompt(100 + i, rng.randrange(1, 400))))
    arrivals.setdefault(1, []).append(("t", prompt(1, PROMPT)))
    assert same(run(engine, arrivals)["t"], alone) == []


def test_logits_with_a_cached_prefix_and_in_chunks(engine, alone):
    mates = [(f"m{i}", prompt(200 + i, 50 + 37 * i)) for i in range(5)]
    hits = engine.blocks.hit_tokens
    cached = run(engine, {0: [("warm", prompt(1, PROMPT)[:200])], 4: [("t", prompt(1, PROMPT))] + mates}, cache=True)["t"]
    assert engine.blocks.hit_tokens - hits >= 192
    assert same(cached, alone) == []
    chunked = run(engine, {0: mates[:3], 1: [("t", prompt(1, PROMPT))], 2: mates[3:]}, chunk=64)["t"]
    assert same(chunked, alone) == []
