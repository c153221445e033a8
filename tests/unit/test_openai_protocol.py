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
        ("max_tokens", 0),
        ("max_tokens", 1.5),
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


def test_unknown_fields_are_refused_by_name():
    param, message = refusal(completion, best_friend=1)
    assert param == "best_friend" and "Extra inputs" in message


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_completion_options_say_so(fields, needle):
    _, message = refusal(completion, **fields)
    assert needle in message


def test_supported_no_op_values_of_unsupported_options_pass():
    req = completion(echo=False, best_of=2, n=2, presence_penalty=0, frequency_penalty=0.0, logit_bias={})
    assert req.n == 2


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


def test_chat_unsupported_options_and_empty_text():
    assert "logprobs" in refusal(chat, logprobs=True)[1]
    assert "tools" in refusal(chat, tools=[{"type": "function"}])[1]
    assert "no text" in refusal(chat, messages=[{"role": "user", "content": ""}])[1]
    assert "response_format" in refusal(chat, response_format={"type": "json_object"})[0]


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
