"""Hermes/Qwen tool calls: parsing whole and streamed text, and the forced-call grammar."""

from __future__ import annotations

import json

import torch

from actors.engine.sampling.grammar import GrammarCompiler
from actors.weights.tokenizer import ByteTokenizer
from cluster.serve import openai_protocol as p
from cluster.serve.tools import StreamingToolParser, forced_call_grammar, parse_tool_calls

TOOL = p.Tool(type="function", function=p.FunctionDef(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}))
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_whole_text_into_content_and_calls():
    content, calls = parse_tool_calls("Let me check.\n" + CALL, {"get_weather"})
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].id.startswith("call_")
    assert parse_tool_calls("no calls here", {"get_weather"}) == ("no calls here", [])
    text = CALL.replace("get_weather", "rm_rf")  # not an offered tool: stays content
    assert parse_tool_calls(text, {"get_weather"}) == (text, [])


def test_streaming_parser_holds_back_tags_and_emits_whole_calls():
    parser = StreamingToolParser({"get_weather"})
    stream = "Hi <" + CALL[1:] + " bye"
    content, calls = "", []
    for i in range(0, len(stream), 3):
        c, new = parser.feed(stream[i:i + 3])
        content += c
        calls += new
    content += parser.finish()
    assert content == "Hi  bye" and [(i, c.name) for i, c in calls] == [(0, "get_weather")]
    lone = StreamingToolParser({"get_weather"})
    assert lone.feed("a <tool") == ("a ", []) and lone.finish() == "<tool"


def test_forced_grammar_accepts_only_calls_of_the_named_tools():
    compiler = GrammarCompiler(ByteTokenizer(), 512, [257])
    spec = forced_call_grammar([TOOL], "get_weather", parallel=False)
    matcher = compiler.matcher(spec)
    for b in CALL.replace(": ", ":").replace(", ", ",").encode():
        mask = compiler.fill_masks([(0, matcher)], 1, torch.device("cpu"))
        assert mask[0, b]
        assert matcher.consume_token(b)
    mask = compiler.fill_masks([(0, matcher)], 1, torch.device("cpu"))
    assert mask[0].nonzero().flatten().tolist() == [257]  # only EOS once the call is complete
    fresh = compiler.matcher(spec)
    assert not compiler.fill_masks([(0, fresh)], 1, torch.device("cpu"))[0, ord("x")]  # must open a call
