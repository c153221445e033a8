"""A request resumed as a continuation (prompt + the tokens it already produced, as the ingress sends
it after a replica died) goes on with exactly the tokens and text it would have had: greedy, seeded
sampling with penalties (counter-based noise, counts rebuilt), and stop strings held back across the
cut. tiny-moge preset on CPU."""

from __future__ import annotations

import pytest

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


def head_and_resume(tiny, prompt, params, cut) -> tuple[list[int], str, list[int], str, str | None]:
    """The tokens and text a client had after `cut` tokens, then the rest from a fresh engine."""
    first = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    first.add_request("r", prompt, params)
    head_ids, head_text = [], ""
    while len(head_ids) < cut:
        for o in first.step():
            head_ids += o.new_token_ids
            head_text += o.new_text
    resumed = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    resumed.add_request("r", prompt, params, generated=head_ids)
    return (head_ids, head_text, *run(resumed, "r"))


CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    "seeded, penalised": SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True,
                                        presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                                        min_tokens=20),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cut", [1, 9])
def test_a_continuation_yields_the_same_tail(tiny, name, cut):
    prompt = tiny.tokenizer.encode("Experts in groups")
    params = CASES[name]
    whole = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
    whole.add_request("r", prompt, params)
    ids, text, reason = run(whole, "r")
    assert len(ids) == 24

    head_ids, head_text, tail_ids, tail_text, tail_reason = head_and_resume(tiny, prompt, params, cut)
    assert head_ids + tail_ids == ids
    assert head_text + tail_text == text and tail_reason == reason


def test_a_stop_string_spanning_the_cut_is_still_cut_out(tiny):
    prompt = tiny.tokenizer.encode("Experts in groups")
    free = LLMEngine(tiny, EngineSpec(256, 64, 16, 4, 2048))
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
