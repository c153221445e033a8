"""Structured output and tool calls with random weights: the grammar alone must make every answer
valid (official `openai` client, real Ray + Serve app on 127.0.0.1)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

pytestmark = pytest.mark.integration

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                       "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"], "additionalProperties": False,
    },
    "enum_array": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "minItems": 1, "maxItems": 4}},
        "required": ["color", "sizes"], "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
                "required": ["id", "tags"], "additionalProperties": False},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["user", "score"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["k", "v"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    },
}

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}


def test_every_json_schema_answer_validates(moge_server):
    client = moge_server.openai()
    jobs = [(name, i) for i in range(25) for name in SCHEMAS]  # 100 requests

    def ask(job):
        name, i = job
        res = client.chat.completions.create(
            model=moge_server.model, messages=[{"role": "user", "content": f"Give me {name} #{i}"}],
            max_tokens=400, temperature=1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}},
        )
        return name, res.choices[0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert len(answers) == 100
    for name, choice in answers:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_object_answers_parse(moge_server):
    res = moge_server.openai().chat.completions.create(
        model=moge_server.model, messages=[{"role": "user", "content": "json please"}], max_tokens=300, n=2,
        temperature=0.7, seed=1, response_format={"type": "json_object"},
    )
    for c in res.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


def check_call(call, allowed: set[str]) -> None:
    assert call.type == "function" and call.id and call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_tool_choice_required_always_yields_valid_calls(moge_server):
    client = moge_server.openai()

    def ask(i):
        return client.chat.completions.create(
            model=moge_server.model, messages=[{"role": "user", "content": f"weather or time? {i}"}],
            tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False,
            max_tokens=300, temperature=1.0, seed=i,
        ).choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, range(16)))
    for c in choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        check_call(c.message.tool_calls[0], {"get_weather", "get_time"})


def test_named_tool_choice_and_streamed_tool_call_deltas(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, messages=[{"role": "user", "content": "time in Paris?"}],
                tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}},
                max_tokens=300, temperature=0)
    whole = client.chat.completions.create(**args).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert len(whole.message.tool_calls) == 1  # a named function is called once, parallel_tool_calls or not
    check_call(whole.message.tool_calls[0], {"get_time"})
    for parallel in (False, True):
        again = client.chat.completions.create(**args, parallel_tool_calls=parallel)
        assert len(again.choices[0].message.tool_calls) == 1
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls
    ]


def test_tool_choice_auto_and_none_answer_and_tool_results_are_accepted(moge_server):
    client = moge_server.openai()
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
    ]
    for choice in ("auto", "none"):
        res = client.chat.completions.create(model=moge_server.model, messages=history, tools=[WEATHER],
                                             tool_choice=choice, max_tokens=8, temperature=0)
        assert res.choices[0].finish_reason in ("stop", "length", "tool_calls")
