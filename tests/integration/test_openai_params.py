"""vLLM-level OpenAI parameters end to end: the official `openai` client (and plain HTTP where the
client has no field) against the real Ray + Serve app on 127.0.0.1 (the session's `moge_server`).

Log-probabilities are checked against the single-process model's own log-softmax at the same
positions, penalties against their definitions applied to the model's logits — not just shapes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from actors.model.reference import one_sequence_batch
from actors.model.kv_cache import PagedKVCache

pytestmark = pytest.mark.integration

PROMPT = "The expert groups of a MoGE layer"
TOL = 2e-4


@torch.no_grad()
def all_logits(loaded, ids: list[int]) -> torch.Tensor:
    """[n, V] float32 logits of every position of ids (row p predicts token p + 1), one prefill."""
    model, cfg = loaded.model, loaded.cfg
    device = next(model.parameters()).device
    blocks = -(-len(ids) // 16)
    kv = PagedKVCache.for_model(cfg, blocks, 16, next(model.parameters()).dtype, device)
    batch = one_sequence_batch(ids, 0, torch.arange(blocks, device=device), device)
    batch.logits_index = torch.arange(len(ids), device=device)
    return model(batch, kv).float()


def ids_of(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def test_completion_logprobs_are_the_models_log_softmax(moge_server, reference_model):
    prompt_ids = reference_model.tokenizer.encode(PROMPT)
    res = moge_server.openai().completions.create(
        model=moge_server.model, prompt=prompt_ids, max_tokens=6, temperature=0, logprobs=5,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = res.choices[0]
    gen = ids_of(choice)
    lp = all_logits(reference_model, prompt_ids + gen).log_softmax(-1)
    n = len(prompt_ids)
    got = choice.logprobs
    assert len(got.token_logprobs) == len(gen) == len(got.tokens) == len(got.text_offset) == len(got.top_logprobs)
    for i, tok in enumerate(gen):
        row = lp[n - 1 + i]
        assert math.isclose(got.token_logprobs[i], row[tok].item(), abs_tol=TOL)
        # byte tokens >= 128 all print as U+FFFD, so compare the best value, not every key
        assert math.isclose(max(got.top_logprobs[i].values()), row.max().item(), abs_tol=TOL)
        assert len(got.top_logprobs[i]) <= 5
    assert got.text_offset == sorted(got.text_offset) and got.text_offset[0] == 0


def test_chat_logprobs_and_top_logprobs_match_the_model(moge_server, reference_model):
    messages = [{"role": "user", "content": "Name a prime."}]
    res = moge_server.openai().chat.completions.create(
        model=moge_server.model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    tok = reference_model.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(messages))  # the byte preset's template has no BOS text
    gen = ids_of(res.choices[0])
    lp = all_logits(reference_model, prompt_ids + gen).log_softmax(-1)
    content = res.choices[0].logprobs.content
    assert len(content) == len(gen)
    for i, (entry, t) in enumerate(zip(content, gen)):
        row = lp[len(prompt_ids) - 1 + i]
        assert math.isclose(entry.logprob, row[t].item(), abs_tol=TOL)
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=TOL)


def test_echo_scoring_sums_the_models_prompt_log_probabilities(moge_server, reference_model):
    prompt_ids = reference_model.tokenizer.encode(PROMPT)
    res = moge_server.openai().completions.create(
        model=moge_server.model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0,
    )
    choice = res.choices[0]
    assert choice.text == PROMPT and res.usage.completion_tokens == 0
    lp = all_logits(reference_model, prompt_ids).log_softmax(-1)
    expected = sum(lp[p, prompt_ids[p + 1]].item() for p in range(len(prompt_ids) - 1))
    assert choice.logprobs.token_logprobs[0] is None
    assert math.isclose(sum(choice.logprobs.token_logprobs[1:]), expected, abs_tol=1e-3)
    assert len(choice.logprobs.tokens) == len(prompt_ids)


def test_prompt_logprobs_are_the_models_with_ranks_and_top_k(moge_server, reference_model):
    """vLLM's extension: per prompt token after the first, {token id: {logprob, rank, decoded_token}}
    holding the prompt token and the k most likely ones."""
    prompt_ids = reference_model.tokenizer.encode(PROMPT)
    with moge_server.http() as client:
        r = client.post("/v1/completions", json={"model": moge_server.model, "prompt": PROMPT, "max_tokens": 1,
                                                 "temperature": 0, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    lp = all_logits(reference_model, prompt_ids).log_softmax(-1)
    assert entries[0] is None and len(entries) == len(prompt_ids)
    for pos, entry in enumerate(entries[1:]):
        row, target = lp[pos], prompt_ids[pos + 1]
        mine = entry[str(target)]
        assert math.isclose(mine["logprob"], row[target].item(), abs_tol=TOL)
        assert mine["rank"] == int((row > row[target]).sum()) + 1
        top = torch.topk(row, 2).indices.tolist()
        assert {int(k) for k in entry} == set(top) | {target}
        assert [entry[str(t)]["rank"] for t in top] == [1, 2]


def test_max_tokens_omitted_generates_to_eos_or_the_context_end(moge_server):
    """As OpenAI and vLLM: no server-side default cap (the tiny model's context is short)."""
    client = moge_server.openai()
    limit = client.models.retrieve(moge_server.model).model_extra["max_model_len"]
    prompt = [65 + i % 26 for i in range(limit - 24)]  # leaves room for 24 tokens
    res = client.completions.create(model=moge_server.model, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "length"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (limit - 24, 24)


def test_streamed_logprobs_and_echo_equal_the_whole_response(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0]
    text, lps = "", []
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                lps += c.logprobs.token_logprobs
    assert text == whole.text
    assert lps == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)


def greedy_with(moge_server, n_tokens: int, **extra) -> list[int]:
    res = moge_server.openai().completions.create(
        model=moge_server.model, prompt=PROMPT, max_tokens=n_tokens, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True, **extra},
    )
    return ids_of(res.choices[0])


@pytest.mark.parametrize("penalty", [
    {"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8},
    {"frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.3},
])
def test_penalties_pick_the_argmax_of_the_penalised_logits(moge_server, reference_model, penalty):
    prompt_ids = reference_model.tokenizer.encode(PROMPT)
    gen = greedy_with(moge_server, 12, **penalty)
    logits = all_logits(reference_model, prompt_ids + gen)
    freq, pres, rep = penalty.get("frequency_penalty", 0), penalty.get("presence_penalty", 0), penalty.get("repetition_penalty", 1)
    for i, tok in enumerate(gen):
        row = logits[len(prompt_ids) - 1 + i].clone()
        counts = torch.bincount(torch.tensor(gen[:i], dtype=torch.long), minlength=row.shape[0]).float()
        seen = counts > 0
        seen[prompt_ids] = True
        row = torch.where(seen, torch.where(row > 0, row / rep, row * rep), row)
        row = row - freq * counts - pres * (counts > 0).float()
        assert tok == int(row.argmax()), (i, penalty)
    plain = greedy_with(moge_server, 12)
    assert plain != gen  # the penalty really changed the output


def test_logit_bias_min_tokens_and_stop_token_ids(moge_server, reference_model):
    eos = reference_model.tokenizer.eos_token_ids[0]
    assert set(greedy_with(moge_server, 5, logit_bias={"65": 100})) == {65}
    res = moge_server.openai().completions.create(
        model=moge_server.model, prompt=PROMPT, max_tokens=10, temperature=0, logit_bias={str(eos): 100},
        extra_body={"min_tokens": 3, "return_token_ids": True},
    )
    ids = ids_of(res.choices[0])
    assert len(ids) == 4 and ids[-1] == eos and eos not in ids[:3] and res.choices[0].finish_reason == "stop"
    plain = greedy_with(moge_server, 6)
    stopped = greedy_with(moge_server, 6, stop_token_ids=[plain[2]])
    assert stopped == plain[: plain.index(plain[2]) + 1]


def test_stop_string_kept_with_include_stop_str_in_output(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**args).choices[0].text
    stop = text[3:5]
    if not stop.strip("\ufffd"):
        pytest.skip("greedy text has no printable stop candidate")
    cut = client.completions.create(**args, stop=[stop]).choices[0].text
    kept = client.completions.create(**{**args, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}},
                                     stop=[stop]).choices[0].text
    assert kept == cut + stop


def test_seeded_sampling_repeats_and_best_of_returns_the_most_likely(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.95, seed=7,
                extra_body={"top_k": 50, "min_p": 0.01, "ignore_eos": True, "return_token_ids": True})
    a = client.completions.create(**args)
    b = client.completions.create(**args, n=3)  # other choices share the batch; choice 0 keeps seed 7
    assert ids_of(a.choices[0]) == ids_of(b.choices[0])
    scored = client.completions.create(**args, n=3, logprobs=0)
    sums = [sum(c.logprobs.token_logprobs) for c in scored.choices]
    best = client.completions.create(**args, n=1, best_of=3, logprobs=0).choices[0]
    assert sum(best.logprobs.token_logprobs) == pytest.approx(max(sums), abs=1e-4)


def sse_events(response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


def test_continuous_usage_and_unknown_fields_are_reported(moge_server):
    body = {"model": moge_server.model, "prompt": PROMPT, "max_tokens": 4, "stream": True, "store": True,
            "service_tier": "auto", "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "ignore_eos": True}
    with moge_server.http() as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["x-ignored-fields"] == "store, service_tier"
        events = sse_events(r)
    with_choices = [e for e in events if e["choices"]]
    assert all("usage" in e for e in with_choices)
    assert [e["usage"]["completion_tokens"] for e in with_choices] == sorted(e["usage"]["completion_tokens"] for e in with_choices)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


def test_tokenize_detokenize_model_card_openapi_and_docs(moge_server, reference_model):
    with moge_server.http() as client:
        r = client.post("/tokenize", json={"model": moge_server.model, "prompt": PROMPT})
        assert r.status_code == 200 and r.json()["tokens"] == reference_model.tokenizer.encode(PROMPT)
        assert r.json()["count"] == len(r.json()["tokens"])
        r = client.post("/detokenize", json={"tokens": reference_model.tokenizer.encode(PROMPT, add_special_tokens=False)})
        assert r.json() == {"prompt": PROMPT}
        assert client.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
        r = client.get(f"/v1/models/{moge_server.model}")
        assert r.status_code == 200 and r.json()["id"] == moge_server.model
        assert client.get("/v1/models/not-a-model").status_code == 404
        doc = client.get("/openapi.json").json()
        assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"} <= set(doc["paths"])
        assert "CompletionRequest" in doc["components"]["schemas"] and "ChatCompletionResponse" in doc["components"]["schemas"]
        assert "swagger" in client.get("/docs").text.lower()
