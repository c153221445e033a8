"""Tool calls in the three families' formats (Hermes/Qwen, Mistral, Pangu): parsing whole and
streamed text, parallel_tool_calls false, the choice of format per checkpoint, and the forced-call
grammar (strict tool schemas closed)."""

from __future__ import annotations

import json

import pytest
import torch

from actors.engine.sampling.grammar import GrammarCompiler
from actors.weights.tokenizer import ByteTokenizer
from cluster.serve import openai_protocol as p
from cluster.serve.tools.formats import HERMES, MISTRAL, PANGU, choose_format
from cluster.serve.tools.grammar import forced_call_grammar
from cluster.serve.tools.parsing import StreamingToolParser, parse_tool_calls

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
    rest, more = parser.finish()
    content, calls = content + rest, calls + more
    assert content == "Hi  bye" and [(i, c.name) for i, c in calls] == [(0, "get_weather")]
    lone = StreamingToolParser({"get_weather"})
    assert lone.feed("a <tool") == ("a ", []) and lone.finish() == ("<tool", [])


ARGS = [{"city": "Paris"}, {"city": "Oslo"}]
TWO_CALLS = {
    HERMES: "\n".join('<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>' % json.dumps(a) for a in ARGS),
    MISTRAL: "[TOOL_CALLS] [" + ", ".join('{"name": "get_weather", "arguments": %s}' % json.dumps(a) for a in ARGS) + "]",
    PANGU: "[unused11][" + ", ".join('{"name": "get_weather", "arguments": %s}' % json.dumps(a) for a in ARGS) + "][unused12]",
}


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, PANGU], ids=lambda f: f.name)
def test_every_format_parses_whole_and_streamed_alike(fmt):
    text = "Checking. " + TWO_CALLS[fmt]
    content, calls = parse_tool_calls(text, {"get_weather"}, fmt)
    assert content == "Checking." and [json.loads(c.arguments) for c in calls] == ARGS
    parser = StreamingToolParser({"get_weather"}, fmt)
    streamed, got = "", []
    for i in range(0, len(text), 2):
        c, new = parser.feed(text[i:i + 2])
        streamed, got = streamed + c, got + new
    rest, more = parser.finish()
    assert (streamed + rest).strip() == "Checking." and [i for i, _ in got + more] == [0, 1]
    assert [json.loads(c.arguments) for _, c in got + more] == ARGS


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, PANGU], ids=lambda f: f.name)
def test_parallel_false_keeps_exactly_the_first_call(fmt):
    _, calls = parse_tool_calls(TWO_CALLS[fmt], {"get_weather"}, fmt, parallel=False)
    assert [json.loads(c.arguments) for c in calls] == ARGS[:1]


def test_mistral_ids_are_the_nine_alphanumerics_its_template_demands_and_bad_blocks_stay_content():
    _, calls = parse_tool_calls(TWO_CALLS[MISTRAL], {"get_weather"}, MISTRAL)
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    broken = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"argu"  # cut off: released as content at the end
    assert parse_tool_calls(broken, {"get_weather"}, MISTRAL) == (broken, [])
    other = TWO_CALLS[PANGU].replace("get_weather", "rm_rf")
    assert parse_tool_calls(other, {"get_weather"}, PANGU) == (other, [])


class _Vocab:
    def __init__(self, ids):
        self.ids = ids

    def token_to_id(self, text):
        return self.ids.get(text)


class _Tok:
    def __init__(self, template="", ids=None):
        self.chat_template = template
        self._tok = _Vocab(ids or {})


def test_the_format_follows_the_flag_then_the_template_then_the_family():
    assert choose_format("mistral", _Tok(), "qwen3_moe") is MISTRAL
    assert choose_format("auto", _Tok("{{ '[TOOL_CALLS] [' }}"), "qwen3_moe") is MISTRAL
    assert choose_format("auto", _Tok("<tool_call>\n{{ tool_call }}"), "mixtral") is HERMES
    assert choose_format("auto", _Tok(), "mixtral") is MISTRAL
    assert choose_format("auto", _Tok(ids={"[unused11]": 45}), "moge") is PANGU
    assert choose_format("auto", ByteTokenizer(), "moge") is HERMES  # the presets
    assert choose_format("auto", _Tok(), "qwen2_moe") is HERMES


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


def _walk(compiler, spec, text: bytes):
    matcher = compiler.matcher(spec)
    for b in text:
        if not compiler.fill_masks([(0, matcher)], 1, torch.device("cpu"))[0, b]:
            return False
        assert matcher.consume_token(b)
    return matcher


def test_forced_grammar_with_parallel_false_allows_no_second_call():
    compiler = GrammarCompiler(ByteTokenizer(), 512, [257])
    one = CALL.replace(": ", ":").replace(", ", ",")
    single = forced_call_grammar([TOOL], "get_weather", parallel=False)
    matcher = _walk(compiler, single, one.encode())
    assert compiler.fill_masks([(0, matcher)], 1, torch.device("cpu"))[0].nonzero().flatten().tolist() == [257]
    assert _walk(compiler, forced_call_grammar([TOOL], "get_weather", parallel=True), (one + "\n" + one).encode())


def test_forced_grammar_in_the_array_formats_and_strict_tools_are_closed():
    compiler = GrammarCompiler(ByteTokenizer(), 512, [257])
    loose = p.Tool(type="function", function=p.FunctionDef(name="get_weather", strict=True, parameters={
        "type": "object", "properties": {"city": {"type": "string"}}}))
    spec = forced_call_grammar([loose], None, parallel=False, fmt=PANGU)
    assert _walk(compiler, spec, b'[unused11][{"name":"get_weather","arguments":{"city":"x"}}][unused12]')
    assert not _walk(compiler, spec, b'[unused11][{"name":"get_weather","arguments":{"city":"x","extra"')
    assert not _walk(compiler, spec, b'[unused11][{"name":"get_weather","arguments":{}}')  # strict: city required
    mistral = forced_call_grammar([TOOL], None, parallel=True, fmt=MISTRAL)
    assert _walk(compiler, mistral, b'[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"a"}}, '
                                    b'{"name":"get_weather","arguments":{"city":"b"}}]')
