"""tool_choice "required" or a named function as a grammar: the output must be a call block of the
allowed tools in the served format, its arguments matching the tool's parameter schema (closed
the OpenAI way when the tool is `strict`), so the call is valid even from an untrained model.
One call when `parallel_tool_calls` is false, else up to MAX_CALLS."""

from __future__ import annotations

import json
from typing import Any

from actors.engine.sampling.grammar import GrammarSpec, lark_json
from cluster.serve.openai_params import strict_schema
from cluster.serve.tools.formats import HERMES, ToolFormat, marker_token_id

MAX_CALLS = 4  # parallel calls a forced grammar allows


def call_schema(tool: Any) -> dict:
    """JSON schema of one call object for this tool."""
    params = tool.function.parameters or {"type": "object", "properties": {}}
    if tool.function.strict:
        params = strict_schema(params)
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _marker(text: str, tokenizer: Any) -> str:
    """A marker as the model emits it: its special token where it is one, else the text."""
    tid = marker_token_id(tokenizer, text) if tokenizer is not None else None
    return f"<[{tid}]>" if tid is not None else json.dumps(text)


def _repeat(rule: str, sep: str, parallel: bool) -> str:
    out = rule
    if parallel:
        for _ in range(MAX_CALLS - 1):
            out = f"{rule} ({sep} {out})?"
    return out


def forced_call_grammar(tools: list[Any], named: str | None, parallel: bool, fmt: ToolFormat = HERMES,
                        tokenizer: Any = None) -> GrammarSpec:
    """The output must be call blocks of the allowed tools: all of them for "required", the named
    one otherwise."""
    allowed = [t for t in tools if named is None or t.function.name == named]
    schemas = [call_schema(t) for t in allowed]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    open_, close = _marker(fmt.open, tokenizer), _marker(fmt.close, tokenizer) if fmt.close else None
    if fmt.array:
        calls = _repeat("call", '", "', parallel)
        start = f'{open_} " "? "[" {calls} "]"' + (f" {close}" if close else "")
        lark = f"start: {start}\ncall: {lark_json(body)}\n"
    else:
        sep = json.dumps(fmt.separator)
        lark = (f"start: {_repeat('block', sep, parallel)}\n"
                f'block: {open_} "\\n" call "\\n" {close}\n'
                f"call: {lark_json(body)}\n")
    return GrammarSpec("lark", lark)
