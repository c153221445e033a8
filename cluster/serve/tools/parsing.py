"""Tool calls out of generated text, whole or streamed, in any ToolFormat (formats.py): content
outside the call blocks stays content, each complete block becomes calls of the offered tools.

A block that is not valid JSON, or names a tool that was not offered, is released as content (the
model's text is never lost). With `parallel=False` only the first call counts: OpenAI's
`parallel_tool_calls: false` means at most one call per answer, so later calls are dropped.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from cluster.serve.tools.formats import HERMES, ToolFormat


def new_call_id(length: int | None = None) -> str:
    if length is not None:  # Mistral's templates refuse any other id shape
        return "".join(random.choices(string.ascii_letters + string.digits, k=length))
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)


def _calls_of(value: Any, allowed: set[str], fmt: ToolFormat) -> list[ParsedCall] | None:
    """The calls one decoded block holds, or None if it is not a block of offered calls."""
    items = value if fmt.array and isinstance(value, list) else [value]
    calls = []
    for obj in items:
        if not isinstance(obj, dict) or obj.get("name") not in allowed:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append(ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args),
                                new_call_id(fmt.id_length)))
    return calls or None


def _decode(body: str) -> tuple[Any, int] | None:
    """(value, end) of the JSON value at the start of body (after whitespace), or None."""
    start = len(body) - len(body.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(body, start)
    except (ValueError, RecursionError):  # not JSON, or nested beyond what Python decodes
        return None
    return value, end


class StreamingToolParser:
    """Text deltas in; content deltas and whole-call deltas out. Text that may be the start of a
    call block is held back until it is known; a complete block becomes (index, ParsedCall) items;
    an invalid or unfinished block is released as content."""

    def __init__(self, allowed: set[str], fmt: ToolFormat = HERMES, parallel: bool = True) -> None:
        self.allowed = allowed
        self.fmt = fmt
        self.parallel = parallel
        self._buf = ""
        self.calls: list[ParsedCall] = []

    def feed(self, delta: str) -> tuple[str, list[tuple[int, ParsedCall]]]:
        return self._scan(delta, final=False)

    def finish(self) -> tuple[str, list[tuple[int, ParsedCall]]]:
        """Whatever is still held back: a block that completes at the end, else content."""
        return self._scan("", final=True)

    def _scan(self, delta: str, final: bool) -> tuple[str, list[tuple[int, ParsedCall]]]:
        self._buf += delta
        fmt, content, new = self.fmt, "", []
        while True:
            start = self._buf.find(fmt.open)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._buf, fmt.open)
                content += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep :]
                return content, new
            content += self._buf[:start]
            self._buf = self._buf[start:]
            rest = self._buf[len(fmt.open):]
            if fmt.close is not None:
                end = rest.find(fmt.close)
                if end < 0:
                    if final:
                        content, self._buf = content + self._buf, ""
                    return content, new
                decoded = _decode(rest[:end])
                whole = decoded is not None and not rest[decoded[1]:end].strip()
                consumed = len(fmt.open) + end + len(fmt.close)
            else:  # the block is the JSON value after the marker
                decoded = _decode(rest)
                if decoded is None and not final:
                    return content, new
                whole = decoded is not None
                consumed = len(fmt.open) + (decoded[1] if decoded else len(rest))
            block, self._buf = self._buf[:consumed], self._buf[consumed:]
            calls = _calls_of(decoded[0], self.allowed, fmt) if whole else None
            if calls is None:
                content += block
                continue
            for call in calls:
                if self.parallel or not self.calls:
                    new.append((len(self.calls), call))
                    self.calls.append(call)
            if not self._buf.strip():
                self._buf = self._buf.lstrip("\n")


def parse_tool_calls(text: str, allowed: set[str], fmt: ToolFormat = HERMES,
                     parallel: bool = True) -> tuple[str | None, list[ParsedCall]]:
    """(content outside the call blocks or None, calls). Blocks that are not valid calls of allowed
    tools stay in the content."""
    parser = StreamingToolParser(allowed, fmt, parallel)
    head, _ = parser.feed(text)
    tail, _ = parser.finish()
    if not parser.calls:
        return text, []
    return (head + tail).strip() or None, parser.calls


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest tail of text that is a proper prefix of token."""
    for n in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0
