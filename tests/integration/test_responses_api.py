"""/v1/responses end to end with the official `openai` client against the real Ray + Serve app
(the session's `moge_server`): the same greedy text as the chat route for the same messages, a
stream whose deltas add up to the whole response, json_schema output that validates (grammar, random
weights), a forced function tool and its result through previous_response_id, and one OpenAI Agents
SDK turn with a function tool."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import jsonschema
import pytest

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}


def test_create_gives_the_chat_routes_greedy_text(moge_server):
    client = moge_server.openai()
    chat = client.chat.completions.create(model=moge_server.model, messages=MESSAGES, max_tokens=16, temperature=0)
    r = client.responses.create(model=moge_server.model, instructions="Be brief.", input="Name a prime.",
                                max_output_tokens=16, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert (r.status == "incomplete") == (chat.choices[0].finish_reason == "length")
    assert client.responses.retrieve(r.id).output_text == r.output_text
    client.responses.delete(r.id)


def test_stream_deltas_add_up_to_the_whole_response(moge_server):
    client = moge_server.openai()
    args = dict(model=moge_server.model, input="Count to three.", max_output_tokens=12, temperature=0)
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_json_schema_output_validates(moge_server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}}}
    client = moge_server.openai()
    for seed in range(3):
        r = client.responses.create(model=moge_server.model, input="A person as JSON.", max_output_tokens=60,
                                    text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                     "strict": True}}, extra_body={"seed": seed})
        value = json.loads(r.output_text)
        jsonschema.validate(value, {**schema, "additionalProperties": False, "required": ["name", "age"]})


def test_a_forced_function_call_then_its_result_via_previous_response_id(moge_server):
    client = moge_server.openai()
    first = client.responses.create(model=moge_server.model, input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                                    max_output_tokens=200)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    second = client.responses.create(model=moge_server.model, previous_response_id=first.id, tools=[WEATHER],
                                     tool_choice="auto", max_output_tokens=8, input=[
                                         {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    assert second.status in ("completed", "incomplete") and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens  # the stored turn went into the prompt


def test_one_agents_sdk_turn_with_a_function_tool(moge_server):
    """The OpenAI Agents SDK, whose default model API is /v1/responses: a forced tool choice makes the
    random-weight model call the tool, and stop_on_first_tool ends the run with the tool's output."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen: list[dict] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Oslo"], unit: Literal["c", "f"]) -> str:
        """Weather in a city."""  # enums: a random-weight model's call is short
        seen.append({"city": city, "unit": unit})
        return f"sunny in {city}"

    async def run():
        client = AsyncOpenAI(base_url=f"{moge_server.base_url}/v1", api_key=moge_server.api_key, max_retries=0, timeout=60)
        agent = agents.Agent(
            name="weather", instructions="Answer with the weather.", tools=[get_weather],
            model=agents.OpenAIResponsesModel(moge_server.model, client),
            model_settings=agents.ModelSettings(tool_choice="get_weather", max_tokens=200, temperature=0),
            tool_use_behavior="stop_on_first_tool",
        )
        try:
            return await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=2)
        finally:
            await client.close()

    result = asyncio.run(asyncio.wait_for(run(), 120))
    assert len(seen) == 1 and seen[0]["city"] in ("Paris", "Oslo") and seen[0]["unit"] in ("c", "f")
    assert result.final_output == f"sunny in {seen[0]['city']}"
