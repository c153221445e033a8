"""The /v1/responses wire format: the create request (strictly typed where it matters, unknown
fields ignored and named as on the other routes) and the Response object with its output items.

Supported: `input` (a string or message / function_call / function_call_output items), `instructions`,
`previous_response_id`, function `tools` with `tool_choice` (none, auto, required, a named function),
`parallel_tool_calls`, `max_tool_calls`, `text.format` (text, json_object, json_schema), sampling
(`temperature`, `top_p`, `max_output_tokens`, `top_logprobs`; vLLM's `seed`, `top_k`, `min_p`,
`repetition_penalty`, `stop` as extensions), `store`, `metadata`, `user`, `stream`.
Refused with a 400 naming the field: `background`, `conversation`, `prompt`, built-in tools (web,
file search, code interpreter, computer, MCP, ...), `truncation: auto`, images and files.
Accepted and without effect: `include` (nothing here has hidden parts), `reasoning`, `service_tier`,
`prompt_cache_*`, `safety_identifier`, `text.verbosity`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.serve.errors import InvalidRequest
from cluster.serve.openai_protocol import INT64_MAX, INT64_MIN, MAX_LOGPROBS, _omit_none, _Request, _Response

MAX_INPUT_ITEMS = 4096


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the Responses API's default is true


class NamedFunctionChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format json_schema needs a schema")
        return self


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Request):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(description="a string, or input items (messages, function_call, "
                                              "function_call_output)")
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_tool_calls: int | None = Field(None, ge=1)
    text: TextConfig | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    store: bool = True
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    conversation: Any = None
    prompt: Any = None
    # vLLM-style extensions, passed to the sampler as on the chat route
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    stop: str | list[str] | None = None

    @field_validator("input")
    @classmethod
    def _input_size(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_INPUT_ITEMS:
            raise ValueError(f"input may hold at most {MAX_INPUT_ITEMS} items")
        if value == "" or value == []:
            raise ValueError("input is empty")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "ResponsesRequest":
        if self.background:
            raise ValueError("background responses are not supported by this server; send the request without "
                             "background and keep the connection open (or stream)")
        if self.conversation is not None:
            raise ValueError("conversation is not supported; chain turns with previous_response_id")
        if self.prompt is not None:
            raise ValueError("prompt (stored prompt templates) is not supported; send instructions and input")
        if self.truncation == "auto":
            raise ValueError("truncation 'auto' is not supported: an input longer than the context is a 400")
        self.function_tools()
        return self

    def function_tools(self) -> list[FunctionTool]:
        """The tools, each a function tool; built-in tools are refused by name."""
        out = []
        for i, tool in enumerate(self.tools or []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise InvalidRequest(f"tools.{i}: tool type {kind!r} is not supported by this server; only "
                                     "function tools are", param=f"tools.{i}.type")
            out.append(FunctionTool.model_validate(tool))
        names = [t.name for t in out]
        if len(set(names)) != len(names):
            raise InvalidRequest("tool names must be unique", param="tools")
        return out


# ------------------------------------------------------------------------------------- output


class OutputText(_Response):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(_Response):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: new_id("msg"))
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class FunctionCall(_Response):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: new_id("fc"))
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class InputTokensDetails(_Response):
    cached_tokens: int = 0


class OutputTokensDetails(_Response):
    reasoning_tokens: int = 0


class Usage(_Response):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(_Response):
    code: str
    message: str


class ResponseObject(_Response):
    id: str = Field(default_factory=lambda: new_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputMessage | FunctionCall] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    store: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = Field(None, exclude_if=_omit_none)
    usage: Usage | None = None

    @property
    def output_text(self) -> str:
        return "".join(c.text for item in self.output if isinstance(item, OutputMessage) for c in item.content)


class ResponseRef(_Request):
    """GET / DELETE /v1/responses/{id} and its cancel, as the ingress hands them to a replica."""

    response_id: str = Field(max_length=256)
