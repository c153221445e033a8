"""The OpenAI API end to end: official `openai` client and plain HTTP against a real local Ray +
Serve app on 127.0.0.1 (fixture `moge_server` in conftest.py).

Greedy tokens over HTTP must equal the single-process reference (actors.model.reference); every client
mistake must come back as a 4xx OpenAI error body and leave the replica serving.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from actors.model.reference import greedy_reference

pytestmark = pytest.mark.integration

PROMPT = "The expert groups of a MoGE layer"


def token_ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def reference_ids(reference_model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    return greedy_reference(reference_model, prompt_ids, max_tokens)


# ------------------------------------------------------------------------------- happy paths


def test_models_lists_the_served_model(moge_server):
    models = moge_server.openai().models.list()
    assert [m.id for m in models.data] == [moge_server.model]


def test_greedy_completion_equals_the_single_process_reference(moge_server, reference_model):
    client = moge_server.openai()
    res = client.completions.create(
        model=moge_server.model, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = res.choices[0]
    prompt_ids = reference_model.tokenizer.encode(PROMPT)
    expected = reference_ids(reference_model, prompt_ids, 24)
    assert token_ids(choice) == expected
    assert res.usage.prompt_tokens == len(prompt_ids)
    assert res.usage.completion_tokens == len(expected)
    assert choice.finish_reason == ("stop" if len(expected) < 24 else "length")


def test_greedy_chat_equals_the_reference_on_the_templated_prompt(moge_server, reference_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    res = moge_server.openai().chat.completions.create(
        model=moge_server.model, messages=messages, max_tokens=16, temperature=0,
        extra_body={"return_token_ids": True},
    )
    tok = reference_model.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(messages))
    assert token_ids(res.choices[0]) == reference_ids(reference_model, prompt_ids, 16)
    assert res.choices[0].message.role == "assistant"
    assert res.object == "chat.completion"


def test_token_id_prompt_is_accepted(moge_server, reference_model):
    prompt_ids = reference_model.tokenizer.encode("abc")
    res = moge_server.openai().completions.create(
        model=moge_server.model, prompt=prompt_ids, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    assert token_ids(res.choices[0]) == reference_ids(reference_model, prompt_ids, 8)


def test_streamed_completion_adds_up_to_the_whole_one(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, prompt=PROMPT, max_tokens=20, temperature=0)
    whole = client.completions.create(**args, extra_body={"return_token_ids": True})
    chunks = list(
        client.completions.create(
            **args, stream=True, stream_options={"include_usage": True}, extra_body={"return_token_ids": True}
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert sum((token_ids(c.choices[0]) for c in text_chunks), []) == token_ids(whole.choices[0])
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_announces_the_role_then_streams_content(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stream_without_usage_option_has_no_usage_chunk(moge_server):
    chunks = list(
        moge_server.openai().completions.create(model=moge_server.model, prompt="x", max_tokens=4, stream=True)
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_n_choices_are_separate_requests_with_their_own_seeds(moge_server):
    client = moge_server.openai()
    res = client.completions.create(
        model=moge_server.model, prompt=PROMPT, max_tokens=12, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert [c.index for c in res.choices] == [0, 1, 2]
    ids = [token_ids(c) for c in res.choices]
    assert all(len(x) == 12 for x in ids)
    assert len({tuple(x) for x in ids}) > 1  # seed + index: the choices differ
    assert res.usage.completion_tokens == 36
    again = client.completions.create(
        model=moge_server.model, prompt=PROMPT, max_tokens=12, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert [token_ids(c) for c in again.choices] == ids  # and are reproducible


def test_n_choices_stream_every_index(moge_server):
    chunks = list(
        moge_server.openai().chat.completions.create(
            model=moge_server.model, messages=[{"role": "user", "content": "go"}], max_tokens=6, n=2, stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_stop_string_cuts_the_text_before_it(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, prompt=PROMPT, max_tokens=40, temperature=0)
    text = client.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    printable = [i for i, ch in enumerate(text) if ch.isprintable() and ch != "\ufffd" and i > 0]
    if not printable:
        pytest.skip("the random model produced no printable character to stop on")
    stop = text[printable[len(printable) // 2]]
    res = client.completions.create(**args, stop=[stop], extra_body={"ignore_eos": True})
    assert res.choices[0].text == text[: text.index(stop)]
    assert res.choices[0].finish_reason == "stop"


def test_max_completion_tokens_limits_chat(moge_server):
    res = moge_server.openai().chat.completions.create(
        model=moge_server.model, messages=[{"role": "user", "content": "go"}], max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert res.usage.completion_tokens == 3 and res.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------ client mistakes (SDK)


BAD_COMPLETIONS = [
    dict(temperature=2.5),
    dict(temperature=-1),
    dict(top_p=0),
    dict(top_p=1.5),
    dict(max_tokens=0),  # only with echo (prompt scoring)
    dict(prompt=""),
    dict(prompt="x" * 3000),  # longer than the 2048-token context
    dict(max_tokens=2040),  # prompt + max_tokens beyond the context
    dict(n=9),  # above server.max_n
    dict(logprobs=21),
    dict(best_of=1, n=2),
    dict(logit_bias={"100000": 1}),  # token id outside the vocabulary
    dict(prompt=[100000]),  # token id outside the vocabulary
]


@pytest.mark.parametrize("override", BAD_COMPLETIONS, ids=lambda d: ",".join(f"{k}" for k in d))
def test_bad_completion_requests_raise_bad_request(moge_server, override):
    args = dict(model=moge_server.model, prompt=PROMPT, max_tokens=4)
    args.update(override)
    with pytest.raises(openai.BadRequestError) as info:
        moge_server.openai().completions.create(**args)
    error = info.value.body
    assert error["type"] == "invalid_request_error" and error["message"]


BAD_CHATS = [
    dict(messages=[]),
    dict(messages=[{"role": "wizard", "content": "x"}]),
    dict(messages=[{"role": "user"}]),
    dict(top_logprobs=2),  # needs logprobs
    dict(temperature=3),
    dict(tool_choice="required"),  # needs tools
    dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}),
]


@pytest.mark.parametrize("override", BAD_CHATS, ids=lambda d: ",".join(d))
def test_bad_chat_requests_raise_bad_request(moge_server, override):
    args = dict(model=moge_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    args.update(override)
    with pytest.raises(openai.BadRequestError):
        moge_server.openai().chat.completions.create(**args)


def test_logprobs_range_message_is_clear(moge_server):
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        moge_server.openai().completions.create(model=moge_server.model, prompt="x", logprobs=21)


def test_streamed_bad_request_is_refused_before_streaming(moge_server):
    with pytest.raises(openai.BadRequestError):
        moge_server.openai().completions.create(model=moge_server.model, prompt="", stream=True)


def test_unknown_model_is_not_found(moge_server):
    with pytest.raises(openai.NotFoundError) as info:
        moge_server.openai().completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("variant", ["other", "prefix", "extended"])
def test_wrong_api_key_is_refused(moge_server, variant):
    key = {"other": "wrong-key", "prefix": moge_server.api_key[:-1], "extended": moge_server.api_key + "x"}[variant]
    with pytest.raises(openai.AuthenticationError):
        moge_server.openai(api_key=key).models.list()


# ------------------------------------------------------------------------- plain HTTP edges


def test_malformed_json_is_a_400_with_an_openai_body(moge_server):
    with moge_server.http() as client:
        r = client.post("/v1/completions", content=b'{"model": "tiny-moge", "prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "tiny-moge", "prompt": "x", "max_tokens": "4"}, "max_tokens"),
        ({"model": "tiny-moge", "prompt": 42}, "prompt"),
        ({"model": "tiny-moge"}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": "tiny-moge", "prompt": "x", "stream": "true"}, "stream"),
        ([1, 2, 3], None),
    ],
)
def test_wrong_types_and_missing_fields_are_400_never_422(moge_server, body, param):
    with moge_server.http() as client:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_oversized_body_is_413_before_parsing(moge_server):
    limit = moge_server.config.server.max_body_bytes
    junk = b"{" + b" " * limit + b"}"  # would be a JSON error if it were parsed
    with moge_server.http() as client:
        r = client.post("/v1/completions", content=junk, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit must hold on the streamed body too
            for _ in range(limit // 65536 + 2):
                yield b" " * 65536

        r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_unknown_route_and_wrong_method(moge_server):
    with moge_server.http() as client:
        r = client.get("/v1/engines")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = client.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json() and r.headers["allow"] == "POST"


def test_auth_covers_every_route_but_health(moge_server):
    with httpx.Client(base_url=moge_server.base_url, timeout=30) as anon:
        assert anon.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/v1/engines"):
            r = anon.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
        r = anon.get("/v1/models", headers={"Authorization": f"Basic {moge_server.api_key}"})
        assert r.status_code == 401


def test_bad_requests_leave_the_replica_serving(moge_server):
    bodies = [b"\xff\xfe", b"null", b'{"model": 1}', json.dumps({"model": "tiny-moge", "prompt": "x", "n": 1000}).encode()]
    with moge_server.http() as client:
        for body in bodies:
            r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        ok = client.post("/v1/completions", json={"model": moge_server.model, "prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


# ------------------------------------------------------------------- disconnect and metrics


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> float:
    """Seconds until predicate() held; raises AssertionError after timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def test_client_disconnect_mid_stream_frees_the_slot(moge_server):
    max_tokens = 1500  # far more than can be generated in the time the abort is given
    body = {"model": moge_server.model, "prompt": "go", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    stamps = []
    with moge_server.http() as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    stamps.append(time.monotonic())
                if len(stamps) == 3:  # the gauge sees the live request (else the test proves nothing)
                    assert moge_server.metric("moge_num_requests_running") == 1
                if len(stamps) >= 6:
                    break
        # leaving the block closes the connection mid-stream
    per_token = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    remaining = per_token * (max_tokens - len(stamps))
    # Had the request kept running it would need `remaining` seconds; it must be gone far sooner.
    budget = min(30.0, max(2.0, remaining / 3))
    took = wait_for(lambda: moge_server.metric("moge_num_requests_running") == 0
                    and moge_server.metric("moge_num_requests_waiting") == 0, budget)
    assert took < remaining
    assert moge_server.metric("moge_kv_cache_usage_ratio") == 0


def test_metrics_count_requests_and_tokens(moge_server):
    before_ok = moge_server.metric("moge_requests_total", 'route="/v1/completions",status="200"')
    before_tokens = moge_server.metric("moge_completion_tokens_total")
    before_ttft = moge_server.metric("moge_time_to_first_token_seconds_count")
    moge_server.openai().completions.create(
        model=moge_server.model, prompt="count me", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert moge_server.metric("moge_requests_total", 'route="/v1/completions",status="200"') == before_ok + 1
    assert moge_server.metric("moge_completion_tokens_total") == before_tokens + 5
    assert moge_server.metric("moge_time_to_first_token_seconds_count") == before_ttft + 1
    with moge_server.http() as client:
        client.get("/v1/engines")
    assert moge_server.metric("moge_requests_total", 'route="other",status="404"') >= 1


def test_a_repeated_prompt_reports_cached_tokens_and_the_same_tokens(moge_server, reference_model):
    # a prompt no other test sends, long enough for several KV blocks
    prompt = "Prefix caching check: " + " ".join(f"w{i}" for i in range(30))
    n = len(reference_model.tokenizer.encode(prompt))
    block = moge_server.config.engine.kv_block_size
    client = moge_server.openai()
    args = dict(model=moge_server.model, prompt=prompt, max_tokens=6, temperature=0)
    first = client.completions.create(**args, extra_body={"return_token_ids": True})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True}))
    # every full block but the one holding the last prompt token, which is always computed
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // block * block > 0
    streamed = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert streamed == token_ids(first.choices[0])
    assert moge_server.metric("moge_prefix_cache_hit_ratio") > 0
