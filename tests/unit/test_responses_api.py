"""/v1/responses over scripted engines with the official openai client (AsyncOpenAI over the ASGI
app, no Ray): input items and instructions as the chat prompt, output items, the stream's event
sequence, tool calls as function_call items, previous_response_id and the store's bounds,
retrieve / delete, and 4xx for what is not supported."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from cluster.config import MogeConfig
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.openai_server import OpenAIServer, ServedModel
from cluster.serve.responses.protocol import ResponseObject
from cluster.serve.responses.store import ResponseStore
from tests.unit.test_openai_defaults import SayingEngine
from tests.unit.test_openai_server import KEY, LetterTokenizer

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def build(text: str = "Hello there", **server):
    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY], **server})
    engine = SayingEngine(text)
    app = build_http_app(OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 4096), cfg.server, ReplicaMetrics("m")))
    return app, engine


def client(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=KEY, http_client=http, max_retries=0)


def prompt_of(engine, i: int = -1) -> str:
    return "".join(chr(t) for t in list(engine.requests.values())[i][0])


def test_create_maps_instructions_and_input_items_and_returns_a_message():
    app, engine = build()

    async def main():
        return await client(app).responses.create(
            model="m", instructions="Be brief.", max_output_tokens=7, temperature=0.5,
            input=[{"role": "user", "content": "hi"},
                   {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]},
                   {"role": "user", "content": [{"type": "input_text", "text": "again"}]}])

    r = asyncio.run(main())
    assert r.status == "completed" and r.output_text == "Hello there" and r.object == "response"
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert prompt_of(engine) == "system:Be brief.\nuser:hi\nassistant:yo\nuser:again\n"
    (_, params), = engine.requests.values()
    assert params.max_tokens == 7 and params.temperature == 0.5
    assert r.usage.input_tokens == len(prompt_of(engine)) and r.usage.output_tokens == 1


def test_a_tool_call_is_a_function_call_item_and_its_output_goes_back_as_a_tool_message():
    app, engine = build(CALL)

    async def main():
        c = client(app)
        first = await c.responses.create(model="m", input="weather in Paris?", tools=[WEATHER])
        call = first.output[0]
        second = await c.responses.create(model="m", previous_response_id=first.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        return first, second

    first, second = asyncio.run(main())
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    history = prompt_of(engine)
    assert "user:weather in Paris?" in history and "tool:sunny" in history  # the stored turn, then the result
    assert second.previous_response_id == first.id


def test_stream_sends_the_responses_event_sequence():
    app, _ = build("Hi")

    async def main():
        stream = await client(app).responses.create(model="m", input="hey", stream=True)
        return [event async for event in stream]

    events = asyncio.run(main())
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Hi" and events[-1].response.status == "completed"


def test_a_streamed_tool_call_and_parallel_false_with_two_calls():
    app, _ = build(CALL + "\n" + CALL.replace("Paris", "Oslo"))

    async def main():
        stream = await client(app).responses.create(model="m", input="w?", tools=[WEATHER], stream=True,
                                                    parallel_tool_calls=False)
        return [event async for event in stream]

    events = asyncio.run(main())
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "Paris"}]
    assert [i.type for i in events[-1].response.output] == ["function_call"]


def test_retrieve_delete_and_not_found():
    app, _ = build()

    async def main():
        c = client(app)
        r = await c.responses.create(model="m", input="hey")
        got = await c.responses.retrieve(r.id)
        await c.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError) as e:
            await c.responses.create(model="m", input="x", previous_response_id=r.id)
        return r, got, e.value

    r, got, err = asyncio.run(main())
    assert got.id == r.id and got.output_text == r.output_text
    assert err.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing_and_the_store_is_bounded_by_count_and_bytes():
    app, _ = build()

    async def main():
        c = client(app)
        r = await c.responses.create(model="m", input="hey", store=False)
        with pytest.raises(openai.NotFoundError):
            await c.responses.retrieve(r.id)

    asyncio.run(main())
    store = ResponseStore(max_items=2, max_bytes=10_000)
    made = [ResponseObject(model="m") for _ in range(3)]
    for r in made:
        assert store.put(r, [{"role": "user", "content": "x"}])
    assert store.get(made[0].id) is None and len(store) == 2
    assert not store.put(ResponseObject(model="m"), [{"role": "user", "content": "x" * 20_000}])
    assert store.bytes <= 10_000


@pytest.mark.parametrize("extra, param", [
    ({"background": True}, None),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input.0.content.0.type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"truncation": "auto"}, None),
    ({"conversation": "conv_1"}, None),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, None),
    ({"model": "other"}, "model"),
])
def test_what_is_not_supported_is_a_4xx_with_an_openai_error(extra, param):
    app, engine = build()

    async def main():
        return await client(app).responses.create(**{"model": "m", "input": "hey", **extra})

    with pytest.raises(openai.APIStatusError) as e:
        asyncio.run(main())
    assert 400 <= e.value.status_code < 500 and e.value.body["message"]
    if param is not None:
        assert e.value.body["param"] == param
    assert engine.requests == {}


def test_json_schema_text_format_reaches_the_grammar():
    app, engine = build('{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    async def main():
        return await client(app).responses.create(model="m", input="x", text={"format": {
            "type": "json_schema", "name": "s", "schema": schema, "strict": True}})

    r = asyncio.run(main())
    (_, params), = engine.requests.values()
    assert json.loads(params.grammar.value) == {**schema, "additionalProperties": False, "required": ["a"]}
    assert r.text.format.type == "json_schema" and json.loads(r.output_text) == {"a": 1}
