"""The OpenAI HTTP wire format: request and response bodies of /v1/completions,
/v1/chat/completions (whole and streamed) and /v1/models.

Known fields are validated strictly (no string-to-number coercion) so a client mistake becomes a 400
naming the field instead of a silently different request. Unknown fields are accepted and ignored, as
vLLM does (clients send newer OpenAI fields such as `store` or `service_tier`, benchmark clients send
`stream_options.continuous_usage_stats`); `ignored_fields` lists them and the server reports them in
the `X-Ignored-Fields` response header and a log line. Extensions beyond OpenAI, as vLLM names them:
`top_k`, `min_p`, `min_tokens`, `repetition_penalty`, `stop_token_ids`, `skip_special_tokens`,
`include_stop_str_in_output`, `ignore_eos`, `return_token_ids`, and on completions `prompt_logprobs`.

Checks that need the server's configuration (model name, context length, max n) live in the
serve app, not here.

Numeric ranges (the "edge" of per-request isolation, see docs/reliability.md): every integer field
must fit in int64 (and `seed + n - 1` too, since choice j samples with seed + j), so nothing a
client sends can overflow when it becomes a tensor or a torch.Generator seed inside an engine step.
A temperature below TEMPERATURE_FLOOR or a top_p below TOP_P_FLOOR is treated as greedy: both
mean "only the most likely token", and computing them literally gives NaN probabilities
(logits / 1e-308) or an empty nucleus (top_p rounds to 0 in float32).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["stop", "length", "abort", "tool_calls"]
MAX_LOGPROBS = 20

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
TEMPERATURE_FLOOR = 1e-5  # below: greedy (the float32 softmax of logits / t overflows for tiny t)
TOP_P_FLOOR = 1e-6  # below: greedy (the nucleus is the top token, float32 cannot hold less)
FREE_FORM_FIELDS = frozenset({"tools", "tool_choice", "response_format"})  # not range-checked: never tensors


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def ignored_fields(self, prefix: str = "") -> list[str]:
        """Dotted names of the unknown fields in this request, nested models included."""
        names = [prefix + k for k in (self.model_extra or {})]
        for name, value in self:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, _Request):
                    index = f"[{i}]" if isinstance(value, list) else ""
                    names += item.ignored_fields(f"{prefix}{name}{index}.")
        return names


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _omit_none(value: Any) -> bool:
    return value is None


# ---------------------------------------------------------------------------------------- requests


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="usage in every chunk (vLLM)")


class JsonSchemaFormat(_Request):
    name: str = Field("response", max_length=256)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class _SamplingFields(_Request):
    """Fields shared by both generation routes."""

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension; -1 or 0 = disabled")
    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    response_format: ResponseFormat | None = None
    return_token_ids: bool = Field(False, description="extension: add token_ids to every choice")
    ignore_eos: bool = Field(False, description="extension: generate max_tokens even past EOS")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    min_tokens: int = Field(0, ge=0, description="extension: EOS and stop ids held back until this many tokens")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="extension, 1 = off")
    stop_token_ids: list[int] | None = Field(None, description="extension")
    skip_special_tokens: bool = Field(True, description="extension")
    include_stop_str_in_output: bool = Field(False, description="extension")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        items = [stop] if isinstance(stop, str) else (stop or [])
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(s == "" for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:  # "²" is isdigit() but no int
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        if bias and len(bias) > 1024:
            raise ValueError("logit_bias may hold at most 1024 entries")
        return bias

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids and (len(ids) > 64 or any(not 0 <= t < 2**31 for t in ids)):
            raise ValueError("stop_token_ids: at most 64 non-negative token ids")
        return ids

    @model_validator(mode="before")
    @classmethod
    def _integers_fit_int64(cls, data: Any) -> Any:
        """Every integer anywhere in the body (fields, token ids, nested) within int64: a bigger
        one can only be a mistake, and must never reach a tensor constructor inside a step."""
        if not isinstance(data, dict):
            return data
        # declared fields only (unknown ones are ignored anyway); free-form JSON (tool schemas) is not ours
        known = {f.alias or name for name, f in cls.model_fields.items()} - FREE_FORM_FIELDS
        bad = _first_big_int({k: v for k, v in data.items() if k in known}, ())
        if bad is not None:
            path, value = bad
            raise ValueError(f"{'.'.join(path) or 'value'}: {value} is outside the 64-bit integer range")
        return data

    @model_validator(mode="after")
    def _seed_plus_n_fits(self) -> "_SamplingFields":
        if self.seed is not None and self.seed + self.n - 1 > INT64_MAX:
            raise ValueError(f"seed + n - 1 must be at most {INT64_MAX} (choice j samples with seed + j)")
        return self

    @model_validator(mode="after")
    def _tiny_temperature_or_top_p_is_greedy(self) -> "_SamplingFields":
        tiny_t = self.temperature is not None and self.temperature < TEMPERATURE_FLOOR
        tiny_p = self.top_p is not None and self.top_p < TOP_P_FLOOR
        if tiny_t or tiny_p:
            # the assignments bypass validation on purpose: these are normalised, not client values
            object.__setattr__(self, "temperature", 0.0)
            if tiny_p:
                object.__setattr__(self, "top_p", 1.0)
        return self

    @model_validator(mode="after")
    def _unsupported(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # str | list[str] | list[int] | list[list[int]], checked below for a readable error
    prompt: Any
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, description="generate best_of, return the n with the highest log-probability")
    suffix: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "extension (vLLM): per prompt token its log-probability and rank, and the k most likely tokens"))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str):
            ok = True
        elif isinstance(prompt, list) and prompt:
            ok = (
                all(isinstance(p, str) for p in prompt)
                or is_ids(prompt)
                or all(is_ids(p) for p in prompt)
            )
        else:
            ok = False
        if not ok:
            raise ValueError(
                "prompt must be a string, an array of strings, an array of token ids, "
                "or an array of token-id arrays"
            )
        return prompt

    @model_validator(mode="after")
    def _completion_unsupported(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise ValueError("best_of > n cannot be streamed")
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise ValueError("max_tokens 0 is only allowed with echo or prompt_logprobs (prompt scoring)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[MessageToolCall] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _chat_unsupported(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if all(m.text() == "" and not m.tool_calls for m in self.messages):
            raise ValueError("messages contain no text")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.response_format is not None and self.response_format.type != "text" and self.forced_tools:
            raise ValueError("response_format cannot be combined with a required or named tool_choice")
        return self

    @property
    def tools_active(self) -> bool:
        """Tools are offered to the model (and its output parsed for calls)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tools(self) -> bool:
        return self.tools_active and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    @property
    def calls_parallel(self) -> bool:
        """More than one tool call may come back: parallel_tool_calls, and no named tool_choice (a
        named function is called exactly once, as vLLM does)."""
        return self.parallel_tool_calls and not isinstance(self.tool_choice, NamedToolChoice)

    @property
    def completion_limit(self) -> int | None:
        """max_completion_tokens is the newer name of max_tokens and wins when both are given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.tool_calls:
                d["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                    for c in m.tool_calls
                ]
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
            out.append(d)
        return out


def _arguments(text: str) -> Any:
    """Chat templates render tool-call arguments as an object; keep text that is not JSON as is.
    Parsed with the bodies' depth bound: arguments nested deeper are a 400 naming the limit."""
    from cluster.serve.errors import InvalidRequest
    from cluster.serve.ingress.json_body import MAX_JSON_DEPTH, loads_bounded

    try:
        return loads_bounded(text, what="tool_calls[].function.arguments")
    except InvalidRequest as e:
        if e.code == "json_too_deep":
            raise InvalidRequest(f"messages[].tool_calls[].function.arguments is nested deeper than the limit of "
                                 f"{MAX_JSON_DEPTH} levels", param="messages", code="json_too_deep") from None
        return text


def _first_big_int(value: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], int] | None:
    """(path, value) of the first int outside int64 in a parsed JSON value, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if INT64_MIN <= value <= INT64_MAX else (path, value)
    if isinstance(value, dict):
        items = ((str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _first_big_int(item, (*path, key))
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(_Response):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=_omit_none)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(_Response):
    """OpenAI's legacy completions shape: parallel lists, one entry per token (prompt tokens first
    with echo; the first prompt token has no log-probability)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Response):
    """vLLM's shape of one prompt token's entry: per token id (as a JSON key) its log-probability,
    rank and text."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(None, exclude_if=_omit_none)
    token_ids: list[int] | None = Field(None, exclude_if=_omit_none)
    prompt_token_ids: list[int] | None = Field(None, exclude_if=_omit_none)


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Response):
    """One server-sent event of a streamed completion; the usage-only last chunk has no choices."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_omit_none)


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None


class ToolCallFunction(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_omit_none)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_omit_none)


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallFunctionDelta(_Response):
    name: str | None = Field(None, exclude_if=_omit_none)
    arguments: str | None = Field(None, exclude_if=_omit_none)


class ToolCallDelta(_Response):
    index: int
    id: str | None = Field(None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(None, exclude_if=_omit_none)
    function: ToolCallFunctionDelta


class ChatDelta(_Response):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)
    tool_calls: list[ToolCallDelta] | None = Field(None, exclude_if=_omit_none)


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = Field(None, exclude_if=_omit_none)


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omit_none)


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "moge"
    max_model_len: int | None = Field(None, exclude_if=_omit_none)


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


class DetokenizeResponse(_Response):
    prompt: str


def sse_event(body: BaseModel | dict) -> bytes:
    """One server-sent event line pair as OpenAI streams it."""
    payload = body.model_dump_json() if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
