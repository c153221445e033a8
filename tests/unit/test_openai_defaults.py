"""vLLM-compatible defaults on the HTTP front, over scripted engines (no Ray): max_tokens omitted
runs to the end of the context unless the server caps it, strict schemas are closed the OpenAI way,
prompt_logprobs reaches the engine and comes back in vLLM's shape, and the tool-call format follows
server.tool_call_parser (prompt, parsing, parallel_tool_calls false)."""

from __future__ import annotations

import json

from actors.engine.sampling.logprobs import TokenLogprob
from cluster.config import MogeConfig
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.openai_params import TokenText, strict_schema, vllm_prompt_logprobs
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.openai_server import OpenAIServer, ServedModel
from tests.unit.test_openai_server import KEY, LetterTokenizer, Out, ScriptedEngine, call, make_app, run


def test_max_tokens_omitted_runs_to_the_end_of_the_context_unless_the_server_caps_it():
    app, engine, _ = make_app()
    assert run(call(app, "POST", "/v1/completions", json={"model": "m", "prompt": "x" * 10})).status_code == 200
    assert run(call(app, "POST", "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})).status_code == 200
    budgets = sorted(params.max_tokens for _, params in engine.requests.values())
    assert budgets == [54, 64 - len("user:hi\n")]  # the whole room left (context 64)
    capped, engine, _ = make_app(max_tokens_default=5)
    run(call(capped, "POST", "/v1/completions", json={"model": "m", "prompt": "x" * 10}))
    assert [params.max_tokens for _, params in engine.requests.values()] == [5]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
        "owner": {"$ref": "#/$defs/Person"},
        "meta": {"type": "object", "additionalProperties": True, "properties": {"a": {"type": "integer"}}},
        "either": {"anyOf": [{"type": "object", "properties": {"x": {"type": "integer"}}}, {"type": "null"}]},
    },
    "required": ["name"],
    "$defs": {"Person": {"type": "object", "properties": {"id": {"type": "integer"}, "nick": {"type": "string"}}}},
}


def test_strict_closes_every_object_and_requires_every_property_recursively():
    closed = strict_schema(SCHEMA)
    assert closed["additionalProperties"] is False
    assert closed["required"] == ["name", "tags", "owner", "meta", "either"]
    item = closed["properties"]["tags"]["items"]
    assert item["additionalProperties"] is False and item["required"] == ["k"]
    assert closed["$defs"]["Person"] == {**SCHEMA["$defs"]["Person"], "additionalProperties": False,
                                         "required": ["id", "nick"]}
    assert closed["properties"]["meta"]["additionalProperties"] is True  # the schema said otherwise
    assert closed["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in SCHEMA  # the client's schema is not changed


def test_response_format_strict_reaches_the_grammar_closed_and_non_strict_as_sent():
    app, engine, _ = make_app()
    for strict in (True, False):
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": strict}}
        r = run(call(app, "POST", "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "response_format": fmt}))
        assert r.status_code == 200, r.text
    sent = [json.loads(params.grammar.value) for _, params in engine.requests.values()]
    assert sent == [strict_schema(SCHEMA), SCHEMA]


def test_prompt_logprobs_reach_the_engine_and_come_back_in_vllms_shape():
    app, engine, _ = make_app()
    r = run(call(app, "POST", "/v1/completions", json={"model": "m", "prompt": "hey", "max_tokens": 1,
                                                         "prompt_logprobs": 2}))
    assert r.status_code == 200, r.text
    (_, params), = engine.requests.values()
    assert params.prompt_logprobs == 2 and params.logprobs is None
    entries = [None, TokenLogprob(101, -2.0, [(120, -0.5), (101, -2.0)], rank=2), TokenLogprob(121, -3.0, [(1, -1.0), (2, -1.5)], rank=9)]
    out = vllm_prompt_logprobs(entries, TokenText(lambda ids, **_: chr(ids[0])), 2)
    assert out[0] is None
    assert {k: v.model_dump() for k, v in out[1].items()} == {
        "120": {"logprob": -0.5, "rank": 1, "decoded_token": "x"}, "101": {"logprob": -2.0, "rank": 2, "decoded_token": "e"}}
    assert list(out[2]) == ["1", "2", "121"] and out[2]["121"].rank == 9


class SayingEngine(ScriptedEngine):
    """Answers every request with one fixed text (the model 'calling' tools in some format)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def generate(self, request_id, prompt_ids, params):
        self.requests[request_id] = (prompt_ids, params)
        text = self.text

        async def stream():
            yield Out(request_id, [1], text, True, "stop")

        return stream()


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
MISTRAL_TWO = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
              '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'


def _server(text: str, **server):
    cfg = MogeConfig.load(env={}, server={"api_keys": [KEY], **server})
    engine = SayingEngine(text)
    srv = OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 4096), cfg.server, ReplicaMetrics("m"))
    return build_http_app(srv), engine


def test_tool_call_parser_setting_picks_the_prompt_and_the_parser_and_parallel_false_keeps_one():
    app, engine = _server(MISTRAL_TWO, tool_call_parser="mistral")
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER]}
    r = run(call(app, "POST", "/v1/chat/completions", json=body))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]] == ["Paris", "Oslo"]
    assert all(len(c["id"]) == 9 for c in message["tool_calls"]) and r.json()["choices"][0]["finish_reason"] == "tool_calls"
    prompt = "".join(chr(i) for i in next(iter(engine.requests.values()))[0])
    assert "[TOOL_CALLS][" in prompt and "<tool_call>" not in prompt  # the system message in that format
    one = run(call(app, "POST", "/v1/chat/completions", json={**body, "parallel_tool_calls": False}))
    assert len(one.json()["choices"][0]["message"]["tool_calls"]) == 1


def test_streamed_calls_in_the_configured_format_and_parallel_false():
    app, _ = _server(MISTRAL_TWO, tool_call_parser="mistral")
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER], "stream": True,
            "parallel_tool_calls": False}
    r = run(call(app, "POST", "/v1/chat/completions", json=body))
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    calls = [tc for e in events for ch in e["choices"] for tc in ch["delta"].get("tool_calls") or []]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
