"""The OpenAI wire models: what is accepted, what is refused with which field named, and what the
responses look like on the wire."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cluster.serve import openai_protocol as p
from cluster.serve.errors import from_validation


def completion(**fields) -> p.CompletionRequest:
    body = {"model": "m", "prompt": "hi", **fields}
    return p.CompletionRequest.model_validate_json(json.dumps(body))


def chat(**fields) -> p.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return p.ChatCompletionRequest.model_validate_json(json.dumps(body))


def refusal(build, **fields) -> tuple[str | None, str]:
    """(param, message) of the 400 the server would send for these fields."""
    with pytest.raises(ValidationError) as info:
        build(**fields)
    err = from_validation(info.value.errors(include_url=False))
    assert err.status == 400 and err.type == "invalid_request_error"
    return err.param, err.message


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_shapes_normalise_to_a_list_of_prompts(prompt, expected):
    assert completion(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("prompt", [[], 5, [1, "a"], [[1], ["x"]], None, {"text": "x"}, [True, False]])
def test_bad_prompt_shapes_are_refused_naming_prompt(prompt):
    param, message = refusal(completion, prompt=prompt)
    assert param == "prompt"
    assert "prompt must be a string" in message


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("temperature", "0.5"),  # strict: no string-to-number coercion
        ("top_p", 0),
        ("top_p", 1.01),
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("logprobs", 21),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("max_tokens", True),
        ("n", 0),
        ("stream", "yes"),
        ("seed", "1"),
        ("top_k", -2),
        ("stop", 3),
        ("stop", [""]),
        ("stop", ["x"] * 17),
    ],
)
def test_out_of_range_or_wrong_type_names_the_field(field, value):
    param, _ = refusal(completion, **{field: value})
    assert param is not None and param.split(".")[0] == field


def test_boundaries_that_are_allowed():
    req = completion(temperature=2, top_p=1, max_tokens=1, top_k=-1, stop="\n")
    assert req.temperature == 2.0 and isinstance(req.temperature, float)
    assert req.stop_list == ["\n"]
    assert completion(stop=["a", "b"]).stop_list == ["a", "b"]
    assert completion().stop_list == []


def test_unknown_fields_are_accepted_and_listed_known_ones_stay_strict():
    req = completion(best_friend=1, store=True, stream=True,
                     stream_options={"include_usage": True, "continuous_usage_stats": True, "future": 1})
    assert req.ignored_fields() == ["best_friend", "store", "stream_options.future"]
    assert req.continuous_usage and req.include_usage_in_stream
    assert refusal(completion, best_friend=1, temperature="hot")[0] == "temperature"


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"max_tokens": 0}, "echo"),
        ({"logit_bias": {"x": 5}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_or_inconsistent_completion_options_say_so(fields, needle):
    _, message = refusal(completion, **fields)
    assert needle in message


def test_vllm_level_options_pass():
    req = completion(echo=True, max_tokens=0, logprobs=5, best_of=2, n=1, presence_penalty=0.5,
                     frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={"1": 5}, min_p=0.1,
                     min_tokens=2, stop_token_ids=[3], skip_special_tokens=False, include_stop_str_in_output=True)
    assert req.best_of == 2 and req.logit_bias == {"1": 5.0}


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages.0.role"),
        ([{"content": "x"}], "messages.0.role"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
        ("hello", "messages"),
    ],
)
def test_bad_messages_are_refused_naming_the_field(messages, param):
    got, _ = refusal(chat, messages=messages)
    assert got is not None and got.startswith(param)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_chat_inconsistent_options_and_empty_text():
    assert "logprobs" in refusal(chat, top_logprobs=2)[1]
    assert refusal(chat, tools=[{"type": "function"}])[0].startswith("tools")
    assert "no text" in refusal(chat, messages=[{"role": "user", "content": ""}])[1]
    assert "json_schema" in refusal(chat, response_format={"type": "json_schema"})[1]
    assert "not in tools" in refusal(chat, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}})[1]
    assert "needs tools" in refusal(chat, tool_choice="required")[1]
    assert "unique" in refusal(chat, tools=[TOOL, TOOL])[1]


def test_chat_tools_and_formats_pass():
    req = chat(tools=[TOOL], tool_choice="required", logprobs=True, top_logprobs=3)
    assert req.forced_tools and req.tools_active
    assert not chat(tools=[TOOL], tool_choice="none").tools_active
    fmt = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert fmt.response_format.json_schema.schema_ == {"type": "object"}
    calls = chat(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}])
    dicts = calls.message_dicts()
    assert dicts[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and dicts[2]["tool_call_id"] == "c1"


def test_chat_content_parts_join_and_completion_limit_prefers_new_name():
    req = chat(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=5,
        max_completion_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert req.message_dicts() == [{"role": "user", "content": "ab"}]
    assert req.completion_limit == 7
    assert req.include_usage_in_stream
    assert chat(max_tokens=5).completion_limit == 5


def test_malformed_json_and_non_object_bodies():
    with pytest.raises(ValidationError) as info:
        p.CompletionRequest.model_validate_json(b'{"model": "m", "prompt": ')
    err = from_validation(info.value.errors(include_url=False))
    assert err.code == "invalid_json" and "not valid JSON" in err.message
    with pytest.raises(ValidationError) as info:
        p.CompletionRequest.model_validate_json(b"[1, 2]")
    assert "JSON object" in from_validation(info.value.errors(include_url=False)).message


def test_response_omits_extension_fields_unless_set_but_keeps_null_finish_reason():
    plain = p.CompletionChoice(index=0, text="x", finish_reason=None)
    assert plain.model_dump(mode="json") == {"index": 0, "text": "x", "finish_reason": None, "logprobs": None}
    with_ids = p.CompletionChoice(index=0, text="x", finish_reason="stop", token_ids=[1, 2])
    assert with_ids.model_dump(mode="json")["token_ids"] == [1, 2]


def test_stream_chunks_and_sse_framing():
    chunk = p.ChatCompletionChunk(
        id="c1", model="m", choices=[p.ChatChunkChoice(index=0, delta=p.ChatDelta(role="assistant", content=""))]
    )
    event = p.sse_event(chunk)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    body = json.loads(event[len(b"data: "):])
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in body  # only the include_usage chunk carries usage
    last = p.ChatCompletionChunk(id="c1", model="m", choices=[], usage=p.Usage.of(3, 4))
    assert json.loads(p.sse_event(last)[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert p.SSE_DONE == b"data: [DONE]\n\n"


def test_model_list_shape():
    body = p.ModelList(data=[p.ModelCard(id="tiny", max_model_len=2048)]).model_dump(mode="json")
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "tiny" and body["data"][0]["object"] == "model"


# ---- numeric ranges at the edge (docs/reliability.md) ---------------------------------------------


@pytest.mark.parametrize("fields, named", [
    ({"top_k": 2**63}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"n": 2**63}, "n"),
    ({"prompt": [1, 2, 2**64]}, "prompt.2"),
])
def test_integers_outside_int64_are_refused_naming_the_field(fields, named):
    _, message = refusal(completion, **fields)
    assert message.startswith(f"{named}:") and "64-bit" in message


def test_seed_plus_n_must_fit_int64():
    _, message = refusal(completion, seed=2**63 - 1, n=2)
    assert "seed + n - 1" in message
    assert completion(seed=2**63 - 2, n=2).seed == 2**63 - 2


@pytest.mark.parametrize("fields", [{"temperature": 1e-308}, {"temperature": 5e-6, "top_p": 0.9},
                                    {"temperature": 0.7, "top_p": 5e-324}])
def test_tiny_temperature_or_top_p_is_greedy(fields):
    for build in (completion, chat):
        req = build(**fields)
        assert req.temperature == 0.0 and (req.top_p is None or req.top_p >= p.TOP_P_FLOOR)


def test_ordinary_temperature_and_top_p_are_kept():
    req = completion(temperature=0.7, top_p=0.9)
    assert (req.temperature, req.top_p) == (0.7, 0.9)
