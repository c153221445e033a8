"""A request resumed as a continuation (prompt + the tokens it already produced, as the ingress sends
it after a replica died) goes on with exactly the tokens and text it would have had: greedy, seeded
sampling with penalties (counter-based noise, counts rebuilt), and stop strings held back across the
cut; with async scheduling (PENDING tokens) and through the async engine, whose streams make the text
(TextStream replayed over the tokens sent). tiny-moge preset on CPU."""

from __future__ import annotations

import asyncio

import pytest

from actors.engine.async_engine import AsyncEngine
from actors.engine.engine import EngineSpec, LLMEngine
from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams
from actors.weights.loader import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("preset:tiny-moge", "float32", "cpu")


def run(engine: LLMEngine, rid: str) -> tuple[list[int], str, str | None]:
    ids, text, reason = [], "", None
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            if o.request_id == rid:
                ids += o.new_token_ids
                text += o.new_text
                reason = o.finish_reason if o.finished else reason
    return ids, text, reason


def engine_for(tiny, async_scheduling: bool = False) -> LLMEngine:
    return LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048, async_scheduling=async_scheduling))


def head(tiny, prompt, params, cut, async_scheduling=False) -> tuple[list[int], str]:
    """The tokens and text a client had after `cut` tokens."""
    first = engine_for(tiny, async_scheduling)
    first.add_request("r", prompt, params)
    head_ids, head_text = [], ""
    while len(head_ids) < cut:
        for o in first.step():
            head_ids += o.new_token_ids
            head_text += o.new_text
    return head_ids, head_text


def head_and_resume(tiny, prompt, params, cut, async_scheduling=False) -> tuple[list[int], str, list[int], str, str | None]:
    """The tokens and text a client had after `cut` tokens, then the rest from a fresh engine."""
    head_ids, head_text = head(tiny, prompt, params, cut, async_scheduling)
    resumed = engine_for(tiny, async_scheduling)
    resumed.add_request("r", prompt, params, generated=head_ids)
    return (head_ids, head_text, *run(resumed, "r"))


TOKENS = 16
CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True),
    "seeded, penalised": SamplingParams(temperature=1.0, seed=7, max_tokens=TOKENS, ignore_eos=True,
                                        presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                                        min_tokens=TOKENS - 2),
}


@pytest.fixture(scope="module")
def uninterrupted(tiny) -> dict:
    """Per case, the whole run's (ids, text, finish reason): one engine run per case, not per cut."""
    out = {}
    for name, params in CASES.items():
        whole = engine_for(tiny)
        whole.add_request("r", tiny.tokenizer.encode("Experts in groups"), params)
        out[name] = run(whole, "r")
    return out


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cut", [1, 9])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_continuation_yields_the_same_tail(tiny, uninterrupted, name, cut, async_scheduling):
    prompt = tiny.tokenizer.encode("Experts in groups")
    params = CASES[name]
    ids, text, reason = uninterrupted[name]
    assert len(ids) == TOKENS

    head_ids, head_text, tail_ids, tail_text, tail_reason = head_and_resume(tiny, prompt, params, cut, async_scheduling)
    assert head_ids + tail_ids == ids
    assert head_text + tail_text == text and tail_reason == reason


def test_the_async_engine_resumes_a_stream_with_its_text(tiny):
    """Serving: the step thread hands out ids only and the stream makes the text, so the stream's
    TextStream is the one replayed; a stop string that spans the cut still ends the request there."""
    prompt = tiny.tokenizer.encode("Experts in groups")
    free = engine_for(tiny)
    free.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    _, text, _ = run(free, "r")
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    whole = engine_for(tiny)
    whole.add_request("r", prompt, params)
    w_ids, w_text, w_reason = run(whole, "r")
    head_ids, head_text = head(tiny, prompt, params, len(w_ids) // 2)
    served = AsyncEngine(engine_for(tiny, async_scheduling=True))

    async def tail():
        ids, text, reason = [], "", None
        async for o in served.generate("r", prompt, params, generated=head_ids):
            ids, text, reason = ids + o.new_token_ids, text + o.new_text, o.finish_reason
        return ids, text, reason

    try:
        t_ids, t_text, t_reason = asyncio.run(asyncio.wait_for(tail(), 60))
    finally:
        served.shutdown()
    assert (head_ids + t_ids, head_text + t_text, t_reason) == (w_ids, w_text, w_reason)


def test_a_stop_string_spanning_the_cut_is_still_cut_out(tiny):
    prompt = tiny.tokenizer.encode("Experts in groups")
    free = engine_for(tiny)
    free.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    ids, text, _ = run(free, "r")
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string that appears mid-output
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    whole = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    whole.add_request("r", prompt, params)
    w_ids, w_text, w_reason = run(whole, "r")
    assert w_reason == "stop" and stop not in w_text
    for cut in sorted({1, len(w_ids) // 2, len(w_ids) - 1}):
        head_ids, head_text, tail_ids, tail_text, tail_reason = head_and_resume(tiny, prompt, params, cut)
        assert (head_ids + tail_ids, head_text + tail_text, tail_reason) == (w_ids, w_text, w_reason), cut


def test_a_continuation_longer_than_max_tokens_is_refused(tiny):
    engine = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    with pytest.raises(RequestRejected):
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4), generated=[5, 6, 7, 8])
