"""The engine on a CUDA device: batched greedy == single-sequence reference, seeded sampling
independent of batch mates (CUDA generators), and the one-copy StepBatch transfer."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny():
    from actors.weights.loader import load_model

    return load_model("preset:tiny-moge", "float32", "cuda")


def run_all(engine, arrivals, max_steps=3000):
    outs: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
        assert step < max_steps
    return outs


@pytest.mark.parametrize("kv_blocks, batched_tokens", [(256, 512), (12, 32)])
def test_cuda_batched_greedy_equals_reference(tiny, kv_blocks, batched_tokens):
    from actors.engine.engine import EngineSpec, LLMEngine
    from actors.model.reference import greedy_reference
    from actors.engine.sampling_params import SamplingParams

    texts = ["GPU", "a", "Mixture of grouped experts on one device, many sequences.", "0123456789" * 5, "hey"]
    prompts = [tiny.tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=16)
    engine = LLMEngine(tiny, EngineSpec(160, kv_blocks, 8, 8, batched_tokens))
    outs = run_all(engine, {i: [(f"r{i}", p, params)] for i, p in enumerate(prompts)})
    for i, p in enumerate(prompts):
        assert outs[f"r{i}"] == greedy_reference(tiny, p, 16), i
    if kv_blocks == 12:
        assert engine.stats().preemptions > 0
    assert engine.stats().kv_usage == 0


def test_cuda_seeded_sampling_ignores_batch_mates(tiny):
    from actors.engine.engine import EngineSpec, LLMEngine
    from actors.engine.sampling_params import SamplingParams

    spec = EngineSpec(160, 128, 8, 8, 256)
    params = SamplingParams(temperature=0.9, top_k=50, seed=5, max_tokens=12, ignore_eos=True)
    prompt = tiny.tokenizer.encode("seeded")
    alone = run_all(LLMEngine(tiny, spec), {0: [("s", prompt, params)]})["s"]
    mates = {0: [("m", tiny.tokenizer.encode("a batch mate with a longer prompt"), SamplingParams(max_tokens=16))],
             1: [("s", prompt, params)], 3: [("g", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4))]}
    assert run_all(LLMEngine(tiny, spec), mates)["s"] == alone
