"""A Responses request as the chat path sees it: input items (and the stored turns before them) as
chat messages, and the whole request as a ChatCompletionRequest, so prompt building, grammars and
tool-call parsing are the chat route's own (cluster/serve/openai_server.py).

Items: messages (`role` user / system / developer / assistant; content a string or input_text /
output_text / refusal parts), `function_call` (the model's earlier call: joins the assistant turn
before it), `function_call_output` (a tool message), `reasoning` (dropped: this server writes none).
Instructions become the first system message; those of a previous response are not carried over,
as OpenAI documents.
"""

from __future__ import annotations

import json
from typing import Any

from cluster.serve import openai_protocol as p
from cluster.serve.errors import InvalidRequest
from cluster.serve.responses.protocol import FunctionCall, NamedFunctionChoice, OutputMessage, ResponsesRequest

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: content must be a string or a list of parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise InvalidRequest(f"{where}.{j}: content part type {kind!r} is not supported (text only: "
                                 "this server serves language models)", param=f"{where}.{j}.type")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.{j}: a {kind} part needs a string", param=f"{where}.{j}")
        out.append(text)
    return "".join(out)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}: {item.get('type')} needs a non-empty string {key!r}", param=f"{where}.{key}")
    return value


def input_messages(items: str | list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
    """Input items -> chat message dicts (ChatCompletionRequest's `messages` shape)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"{param}.{i}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: an input item must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(f"{where}: role must be user, system, developer or assistant", param=f"{where}.role")
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function",
                    "function": {"name": _string(item, "name", where), "arguments": item.get("arguments") or "{}"}}
            if not isinstance(call["function"]["arguments"], str):
                raise InvalidRequest(f"{where}: arguments must be a JSON string", param=f"{where}.arguments")
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls join the assistant turn before them
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise InvalidRequest(f"{where}: input item type {kind!r} is not supported (message, function_call, "
                                 "function_call_output)", param=f"{where}.type")
    return messages


def output_messages(output: list[OutputMessage | FunctionCall]) -> list[dict[str, Any]]:
    """A response's output as the assistant turn it was."""
    turn: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if isinstance(item, OutputMessage):
            turn["content"] += "".join(c.text for c in item.content)
        else:
            turn.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
    return [turn]


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]]) -> p.ChatCompletionRequest:
    """The chat request that generates this response: instructions, the stored turns, the input."""
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history
    messages += input_messages(req.input)
    tools = req.function_tools()
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "parallel_tool_calls": req.parallel_tool_calls and (req.max_tool_calls or 2) > 1,
    }
    if tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters,
            "strict": True if t.strict is None else t.strict}} for t in tools]
    choice = req.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict, "description": fmt.description}}
    if req.top_logprobs is not None:
        body.update(logprobs=True, top_logprobs=req.top_logprobs)
    extras = {"max_completion_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
              "seed": req.seed, "top_k": req.top_k, "min_p": req.min_p,
              "repetition_penalty": req.repetition_penalty, "stop": req.stop, "user": req.user}
    body.update({k: v for k, v in extras.items() if v is not None})
    try:
        return p.ChatCompletionRequest.model_validate(body)
    except ValueError as e:  # e.g. tool_choice names a tool that is not offered
        raise InvalidRequest(_first_error(e)) from e


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = (errors(include_url=False) or [{}])[0]
        return str(first.get("msg", e)).removeprefix("Value error, ")
    return str(e)


def stored_size(obj: Any) -> int:
    """Bytes a stored value costs, roughly: its JSON."""
    return len(json.dumps(obj, default=str))
