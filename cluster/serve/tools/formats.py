"""The tool-call formats of the families served, as their chat templates define them, and which
one a checkpoint gets.

| format  | the model writes                                                   | families |
| ------- | ------------------------------------------------------------------ | -------- |
| hermes  | `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call | Qwen2/3(-MoE), Hermes, the presets |
| mistral | `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, to the end of the answer | Mixtral / Mistral (v3 tokenizer templates) |
| pangu   | `[unused11][{"name": ..., "arguments": {...}}, ...][unused12]`      | Pangu Pro MoE (openPangu) |

Choice (`server.tool_call_parser`, `--tool-call-parser`): a name wins; `auto` reads the checkpoint's
chat template (the marker it renders assistant tool calls with), then the family (mixtral ->
mistral; a MoGE checkpoint whose vocabulary has `[unused11]` -> pangu), else hermes.

Mistral's and Pangu's markers are special tokens of their tokenizers: a request with tools then
keeps special tokens in its text (else the detokenizer would drop the marker), and a forced-call
grammar names the marker by token id (`<[id]>`), the way the model emits it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # the marker before a block of calls
    close: str | None  # after it; None: the block runs to the end of the answer
    array: bool  # a block holds a JSON array of calls (else one call object)
    separator: str = "\n"  # between blocks in a forced-call grammar (one-call-per-block formats)
    id_length: int | None = None  # tool-call ids the template accepts: Mistral's must be 9 alphanumerics


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", array=False)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", None, array=True, id_length=9)
PANGU = ToolFormat("pangu", "[unused11]", "[unused12]", array=True)
FORMATS = {f.name: f for f in (HERMES, MISTRAL, PANGU)}
PARSER_NAMES = ("auto", *FORMATS)


def choose_format(setting: str, tokenizer: Any, family: str = "") -> ToolFormat:
    if setting != "auto":
        return FORMATS[setting]
    template = getattr(tokenizer, "chat_template", None) or ""
    for fmt in (MISTRAL, PANGU, HERMES):  # the marker the template writes assistant calls with
        if fmt.open in template:
            return fmt
    if family == "mixtral":
        return MISTRAL
    if family == "moge" and marker_token_id(tokenizer, PANGU.open) is not None:
        return PANGU
    return HERMES


def marker_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one (special) token, else None."""
    raw = getattr(tokenizer, "_tok", None)  # HFTokenizer's tokenizers.Tokenizer
    if raw is None:
        return None
    tid = raw.token_to_id(text)
    return None if tid is None else int(tid)


def keeps_special_tokens(fmt: ToolFormat, tokenizer: Any) -> bool:
    """Whether the output text must keep special tokens for this format's markers to appear."""
    return any(m is not None and marker_token_id(tokenizer, m) is not None for m in (fmt.open, fmt.close))


def tools_system_prompt(tools: list[Any], fmt: ToolFormat = HERMES) -> str:
    """For chat templates that do not render `tools`: the instructions in this format."""
    listing = "\n".join(json.dumps({"type": "function", "function": t.function.model_dump(exclude_none=True)})
                        for t in tools)
    example = '{"name": <function-name>, "arguments": <args-json-object>}'
    if fmt.array:
        how = (f"To call functions, answer with {fmt.open} followed by a JSON array of calls"
               f"{' and then ' + fmt.close if fmt.close else ''}:\n{fmt.open}[{example}]{fmt.close or ''}")
    else:
        how = ("For each function call, return a json object with function name and arguments within "
               f"{fmt.open}{fmt.close} XML tags:\n{fmt.open}\n{example}\n{fmt.close}")
    return ("You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n{how}")
