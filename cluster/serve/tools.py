"""Tool calling in the Hermes / Qwen format: the model writes

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(one block per call) and the server returns OpenAI `tool_calls`. Three jobs:
- the prompt: chat templates that know `tools` (Qwen2.5/3, Hermes) render them themselves; for a
  template that does not, a system message in the same format lists the tools;
- enforcement: tool_choice "required" or a named function becomes a grammar (Lark with the arguments'
  JSON schema embedded) so the output is a valid call even from an untrained model;
- parsing: whole texts, and streamed text deltas turned into content deltas and tool-call deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from actors.engine.sampling.grammar import GrammarSpec, lark_json

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)
_MAX_CALLS = 4  # parallel calls a forced grammar allows


def _params_schema(tool: Any) -> dict:
    schema = tool.function.parameters or {"type": "object", "properties": {}}
    return schema


def call_schema(tool: Any) -> dict:
    """JSON schema of one call block's body for this tool."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": _params_schema(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_call_grammar(tools: list[Any], named: str | None, parallel: bool) -> GrammarSpec:
    """The output must be one (or, with parallel calls, up to _MAX_CALLS) call blocks of the allowed
    tools: all of them for "required", the named one otherwise."""
    allowed = [t for t in tools if named is None or t.function.name == named]
    schemas = [call_schema(t) for t in allowed]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    calls = "call"
    if parallel:
        for _ in range(_MAX_CALLS - 1):
            calls = f'call ("\\n" {calls})?'
    lark = (
        f"start: {calls}\n"
        f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
        f"body: {lark_json(body)}\n"
    )
    return GrammarSpec("lark", lark)


def tools_system_prompt(tools: list[Any]) -> str:
    """For chat templates that do not render `tools`: the Hermes instructions as a system message."""
    listing = "\n".join(json.dumps({"type": "function", "function": t.function.model_dump(exclude_none=True)}) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f'{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


def _parse_block(text: str, allowed: set[str]) -> ParsedCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in allowed:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


def parse_tool_calls(text: str, allowed: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content outside the call blocks or None, calls). Blocks that are not valid calls of allowed
    tools stay in the content."""
    calls: list[ParsedCall] = []
    content: list[str] = []
    last = 0
    for m in _BLOCK.finditer(text):
        call = _parse_block(m.group(1), allowed)
        if call is None:
            continue
        content.append(text[last : m.start()])
        calls.append(call)
        last = m.end()
    content.append(text[last:])
    rest = "".join(content).strip() if calls else "".join(content)
    return (rest or None) if calls else text, calls


class StreamingToolParser:
    """Text deltas in; content deltas and whole-call deltas out. Text that may be the start of a
    call block is held back until it is known; a complete block becomes one ToolCallDelta-like
    (index, ParsedCall); an invalid or unfinished block is released as content."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self._buf = ""
        self.calls: list[ParsedCall] = []

    def feed(self, delta: str) -> tuple[str, list[tuple[int, ParsedCall]]]:
        self._buf += delta
        content, new = "", []
        while True:
            start = self._buf.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._buf, OPEN)
                content += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep :]
                return content, new
            content += self._buf[:start]
            self._buf = self._buf[start:]
            end = self._buf.find(CLOSE)
            if end < 0:
                return content, new
            block = self._buf[len(OPEN) : end]
            self._buf = self._buf[end + len(CLOSE) :]
            call = _parse_block(block.strip(), self.allowed)
            if call is None:
                content += OPEN + block + CLOSE
            else:
                new.append((len(self.calls), call))
                self.calls.append(call)
                self._buf = self._buf.lstrip("\n") if not self._buf.strip() else self._buf

    def finish(self) -> str:
        """Whatever is still held back, as content."""
        rest, self._buf = self._buf, ""
        return rest


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest tail of text that is a proper prefix of token."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0
