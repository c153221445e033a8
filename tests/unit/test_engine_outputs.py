"""What the engine reports beyond tokens: prompt log-probabilities through chunked prefill (the
model's head over prompt positions), per-token log-probabilities, max_tokens 0 scoring, and
grammar-constrained output — on the tiny-moge preset against its own all-position log-softmax."""

from __future__ import annotations

import json

import pytest
import torch

from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.sampling.grammar import GrammarSpec
from actors.engine.sampling_params import SamplingParams
from actors.model.kv_cache import PagedKVCache
from actors.model.reference import one_sequence_batch


@pytest.fixture(scope="module")
def tiny():
    from actors.weights.loader import load_model

    torch.manual_seed(0)
    return load_model("preset:tiny-moge", "float32", "cpu")


@torch.no_grad()
def log_softmax_all(loaded, ids: list[int]) -> torch.Tensor:
    blocks = -(-len(ids) // 16)
    kv = PagedKVCache.for_model(loaded.cfg, blocks, 16, torch.float32, torch.device("cpu"))
    batch = one_sequence_batch(ids, 0, torch.arange(blocks), torch.device("cpu"))
    batch.logits_index = torch.arange(len(ids))
    return loaded.model(batch, kv).float().log_softmax(-1)


def outputs(engine: LLMEngine, max_steps: int = 500):
    got: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o)
    return got


@pytest.mark.parametrize("chunk", [7, 2048])  # chunked prefill and one-step prefill
def test_prompt_and_token_logprobs_equal_the_models_log_softmax(tiny, chunk):
    prompt = tiny.tokenizer.encode("Mixture of grouped experts balances load.")
    engine = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, chunk))
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True))
    engine.add_request("mate", prompt[:5], SamplingParams(temperature=0.7, max_tokens=6))  # shares the steps
    outs = outputs(engine)["a"]
    gen = [t for o in outs for t in o.new_token_ids]
    lp = log_softmax_all(tiny, prompt + gen)
    prompt_lps = outs[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt)
    for p, entry in enumerate(prompt_lps[1:], start=1):
        assert entry.token_id == prompt[p]
        assert entry.logprob == pytest.approx(lp[p - 1, prompt[p]].item(), abs=1e-4)
        assert [i for i, _ in entry.top] == lp[p - 1].topk(2).indices.tolist()
    token_lps = [e for o in outs for e in (o.logprobs or [])]
    assert [e.token_id for e in token_lps] == gen
    for i, e in enumerate(token_lps):
        row = lp[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(row[gen[i]].item(), abs=1e-4)
        assert [v for _, v in e.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert all(o.prompt_logprobs is None for o in outs[1:])  # sent once


def test_max_tokens_zero_scores_the_prompt_without_generating(tiny):
    prompt = tiny.tokenizer.encode("score me")
    engine = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    engine.add_request("s", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    (out,) = outputs(engine)["s"]
    assert out.finished and out.finish_reason == "length" and out.new_token_ids == [] and out.completion_tokens == 0
    lp = log_softmax_all(tiny, prompt)
    total = sum(e.logprob for e in out.prompt_logprobs[1:])
    assert total == pytest.approx(sum(lp[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)), abs=1e-3)
    assert len(engine.slots._free) == 4  # no sampling slot held


def test_grammar_constrained_requests_validate_next_to_free_ones(tiny):
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["k", "n"], "additionalProperties": False}
    engine = LLMEngine(tiny, EngineSpec(512, 128, 16, 8, 2048))
    spec = GrammarSpec("json_schema", json.dumps(schema))
    for i in range(4):
        engine.add_request(f"g{i}", tiny.tokenizer.encode("json:"), SamplingParams(temperature=1.0, seed=i, max_tokens=64, grammar=spec))
    engine.add_request("free", tiny.tokenizer.encode("free text"), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    got = outputs(engine)
    for i in range(4):
        text = "".join(o.new_text for o in got[f"g{i}"])
        assert got[f"g{i}"][-1].finish_reason == "stop"
        value = json.loads(text)
        assert value["k"] in ("a", "b") and 0 <= value["n"] <= 9 and set(value) == {"k", "n"}
    from actors.model.reference import greedy_reference

    free = [t for o in got["free"] for t in o.new_token_ids]
    assert free == greedy_reference(tiny, tiny.tokenizer.encode("free text"), 8, stop_at_eos=False)


def test_prompt_logprobs_are_complete_when_the_prefix_is_cached(tiny):
    prompt = tiny.tokenizer.encode("a prompt long enough to fill two sixteen-token blocks of cache")
    engine = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    engine.add_request("warm", prompt, SamplingParams(temperature=0, max_tokens=1))
    outputs(engine)
    engine.add_request("score", prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    (out,) = outputs(engine)["score"]
    assert len(out.prompt_logprobs) == len(prompt)  # the cached prefix was computed again for its logits
    engine.add_request("plain", prompt, SamplingParams(temperature=0, max_tokens=1))
    assert outputs(engine)["plain"][0].cached_tokens > 0  # other requests still use the cache
