"""From an OpenAI request to engine SamplingParams, and from engine log-probabilities back to
OpenAI's two logprobs shapes (legacy completions and chat).

Token strings in logprobs are each token decoded alone with special tokens kept (a byte-level token
that ends inside a UTF-8 character shows U+FFFD; `bytes` carries what its text encodes to).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from actors.engine.sampling.grammar import GrammarSpec
from actors.engine.sampling.logprobs import TokenLogprob
from actors.engine.sampling_params import SamplingParams
from cluster.serve import openai_protocol as p
from cluster.serve.errors import InvalidRequest


def output_grammar(req: p._SamplingFields) -> GrammarSpec | None:
    """response_format -> grammar (json_object: any JSON object; json_schema: that schema, closed
    the OpenAI way when `strict` is true)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    return schema_grammar(fmt.json_schema.schema_, bool(fmt.json_schema.strict))


def schema_grammar(schema: dict, strict: bool) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps(strict_schema(schema) if strict else schema))


# keywords whose value is a schema, or a list / map of schemas (JSON Schema 2020-12 and draft 7)
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_schema(schema: Any) -> Any:
    """OpenAI's strict structured output: every object is closed (`additionalProperties: false`
    unless the schema says otherwise) and requires all its properties, recursively through
    properties, items, combinators and definitions. A copy; the client's schema is left as sent.
    OpenAI refuses a strict schema whose `required` misses a property; here it is completed, so
    the answer carries every key as OpenAI's would (a pydantic model with defaults still works)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), (dict, list)):
            out[key] = strict_schema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: strict_schema(v) for k, v in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in out
    if is_object:
        out.setdefault("additionalProperties", False)
        props = out.get("properties")
        if isinstance(props, dict):
            required = [r for r in out.get("required", []) if isinstance(r, str)]
            out["required"] = required + [k for k in props if k not in required]
    return out


def sampling_params(
    req: p._SamplingFields,
    index: int,
    max_tokens: int,
    *,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: Any = None,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    """The engine parameters of choice `index` (a seed gives choice j the seed + j: distinct but
    reproducible choices)."""
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        min_p=req.min_p or 0.0,
        seed=None if req.seed is None else req.seed + index,
        max_tokens=max_tokens,
        min_tokens=min(req.min_tokens, max_tokens),
        stop=req.stop_list,
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=bias,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        grammar=grammar,
    )


def check_vocab(req: p._SamplingFields, vocab: int) -> None:
    for key in req.logit_bias or {}:
        if int(key) >= vocab:
            raise InvalidRequest(f"logit_bias token id {key} is outside the vocabulary [0, {vocab})", param="logit_bias")
    for t in req.stop_token_ids or []:
        if t >= vocab:
            raise InvalidRequest(f"stop token id {t} is outside the vocabulary [0, {vocab})", param="stop_token_ids")


class TokenText:
    """Token id -> its text alone, cached (logprob responses name every token and its top k)."""

    def __init__(self, decode: Callable[..., str]) -> None:
        self._decode = decode
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            try:
                text = self._decode([token_id], skip_special_tokens=False)
            except TypeError:  # a decoder without the keyword
                text = self._decode([token_id])
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


def completion_logprobs(
    entries: list[TokenLogprob | None], token_text: TokenText, offset: int
) -> tuple[p.CompletionLogprobs, int]:
    """Legacy shape for a run of tokens starting at text offset `offset`; None entries (the first
    prompt token) have no log-probability. Returns the next offset too."""
    out = p.CompletionLogprobs()
    for e in entries:
        if e is None:
            continue
        text = token_text(e.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(e.logprob)
        top: dict[str, float] = {}
        for i, lp in e.top:  # tokens that print alike keep the likelier entry
            top.setdefault(token_text(i), lp)
        out.top_logprobs.append(top or None)
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


def first_prompt_entry(token_id: int, token_text: TokenText, out: p.CompletionLogprobs) -> int:
    """The first prompt token of an echo: its text, no log-probability. Returns its length."""
    text = token_text(token_id)
    out.tokens.append(text)
    out.token_logprobs.append(None)
    out.top_logprobs.append(None)
    out.text_offset.append(0)
    return len(text)


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], token_text: TokenText, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a map from token id
    to {logprob, rank, decoded_token} holding the prompt token and the k most likely ones."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        entry = {str(i): p.PromptLogprob(logprob=lp, rank=r + 1, decoded_token=token_text(i))
                 for r, (i, lp) in enumerate(e.top[:k])}
        entry.setdefault(str(e.token_id), p.PromptLogprob(logprob=e.logprob, rank=e.rank,
                                                          decoded_token=token_text(e.token_id)))
        out.append(entry)
    return out


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText, top: int) -> p.ChatLogprobs:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return p.ChatLogprobs(
        content=[
            p.ChatTokenLogprob(**item(e.token_id, e.logprob), top_logprobs=[p.TopLogprob(**item(i, lp)) for i, lp in e.top[:top]])
            for e in entries
        ]
    )
