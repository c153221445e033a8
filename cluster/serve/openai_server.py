"""The OpenAI routes of an attention replica, as a plain FastAPI app over an async engine.

Kept apart from Ray Serve (cluster/serve/app.py) so the whole HTTP surface can also run in one
process over a fake engine in unit tests. What this file decides:
- a request body is read with a byte limit *before* it is parsed (413), then validated strictly;
- every client mistake is a 4xx in OpenAI's error shape (cluster/serve/errors.py), checked before any
  engine work starts;
- n choices (× prompts) are n independent engine requests, merged into one stream;
- a streamed response closes its generators when the client goes away, which makes the engine
  abort those requests and free their KV blocks;
- latencies run from the request's arrival at this replica (stamped by the outermost middleware)
  to what is handed to the client (cluster/serve/metrics/request_timer.py), and a stream that fell
  behind its engine requests sends what is waiting as one chunk per choice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams
from cluster.serve import openai_protocol as p
from cluster.serve.openai_params import (
    TokenText, chat_logprobs, check_vocab, completion_logprobs, first_prompt_entry, output_grammar, sampling_params,
    vllm_prompt_logprobs,
)
from cluster.serve.tools.formats import choose_format, keeps_special_tokens, tools_system_prompt
from cluster.serve.tools.grammar import forced_call_grammar
from cluster.serve.tools.parsing import StreamingToolParser, parse_tool_calls
from cluster.serve.middleware.auth import ApiKeyMiddleware, ApiKeys
from cluster.config import ServerSection
from cluster.serve.errors import (BodyTooLarge, ErrorBoundary, InvalidRequest, ModelNotFound, as_api_error,
                                  install_handlers)
from cluster.serve.metrics.replica import CONTENT_TYPE, ReplicaMetrics
from cluster.serve.middleware.scope import ARRIVAL, arrival_of, route_path
from cluster.serve.openapi_doc import body_schema, install_docs_ui, install_request_schemas, parse_request, report_ignored
from cluster.serve.middleware.request_guard import GuardLimits, RequestGuard, post_route_matcher
from cluster.serve.responses.routes import install_responses
from cluster.serve.streaming import ClosingStreamingResponse, _merge

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics",
                "/admin/status", "/admin/scale", "/admin/migrate", "/tokenize", "/detokenize",
                "/openapi.json", "/docs", "/redoc", "/v1/responses")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


class GenerationEngine(Protocol):
    """What the front needs from actors.engine.async_engine.AsyncEngine."""

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Any]: ...

    def stats(self) -> Any: ...


@dataclass(frozen=True)
class ServedModel:
    name: str
    tokenizer: Tokenizer
    max_model_len: int
    family: str = ""  # ModelConfig.family: picks the tool-call format with the chat template


@dataclass
class _Choice:
    """One engine request behind one response choice."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams


class OpenAIServer:
    def __init__(
        self, engine: GenerationEngine, model: ServedModel, settings: ServerSection, metrics: ReplicaMetrics
    ) -> None:
        self.engine = engine
        self.model = model
        self.settings = settings
        self.metrics = metrics
        decode = getattr(model.tokenizer, "decode", None)
        self.token_text = TokenText(decode) if decode is not None else None
        self.tool_format = choose_format(settings.tool_call_parser, model.tokenizer, model.family)

    # ------------------------------------------------------------------------------------ routes

    def models(self) -> p.ModelList:
        return p.ModelList(data=[self.model_card()])

    def model_card(self, model_id: str | None = None) -> p.ModelCard:
        if model_id is not None and model_id != self.model.name:
            raise ModelNotFound(model_id, self.model.name)
        return p.ModelCard(id=self.model.name, max_model_len=self.model.max_model_len)

    async def completions(self, req: p.CompletionRequest, arrival: float | None = None) -> Response:
        """`arrival`: when the request reached this replica (metrics clock); None: now."""
        self._check_common(req)
        prompts = [self._prompt_ids(x, "prompt") for x in req.prompts()]
        texts = [x if isinstance(x, str) else None for x in req.prompts()]
        k = req.logprobs
        candidates = req.best_of or req.n
        scored = k if k is not None else (0 if candidates > req.n else None)  # best_of ranks by logprob
        wanted = [x for x in (k if req.echo else None, req.prompt_logprobs) if x is not None]
        grammar = await self.compiled(output_grammar(req))
        choices = self._plan(req, prompts, req.max_tokens, candidates, lambda j, budget: sampling_params(
            req, j, budget, logprobs=scored, prompt_logprobs=max(wanted) if wanted else None, grammar=grammar,
        ))
        rid = p.new_id("cmpl")
        echo = _Echo(self, req, prompts, texts)
        if req.stream:
            return await self._stream(rid, req, choices, _CompletionChunks(rid, self.model.name, echo, [c.prompt_index for c in choices]), arrival)
        outs = await self.collect(rid, choices, arrival)
        picked = _best(choices, outs, req.n, candidates)
        return JSONResponse(
            p.CompletionResponse(
                id=rid,
                model=self.model.name,
                choices=[
                    p.CompletionChoice(
                        index=i,
                        text=echo.text(c.prompt_index) + o.text,
                        finish_reason=o.finish_reason,
                        logprobs=echo.logprobs(c.prompt_index, o) if k is not None else None,
                        prompt_logprobs=echo.prompt_logprobs(o),
                        token_ids=o.token_ids if req.return_token_ids else None,
                        prompt_token_ids=c.prompt_ids if req.return_token_ids and req.echo else None,
                    )
                    for i, (c, o) in enumerate(picked)
                ],
                usage=_usage(choices, outs),
            ).model_dump(mode="json")
        )

    async def chat(self, req: p.ChatCompletionRequest, arrival: float | None = None) -> Response:
        choices, k, tools = await self.chat_plan(req)
        rid = p.new_id("chatcmpl")
        if req.stream:
            chunks = _ChatChunks(rid, self.model.name, self, k, tools, req.calls_parallel)
            return await self._stream(rid, req, choices, chunks, arrival)
        outs = await self.collect(rid, choices, arrival)
        return JSONResponse(
            p.ChatCompletionResponse(
                id=rid,
                model=self.model.name,
                choices=[self._chat_choice(c, o, k, tools, req) for c, o in zip(choices, outs)],
                usage=_usage(choices, outs),
            ).model_dump(mode="json")
        )

    async def chat_plan(self, req: p.ChatCompletionRequest) -> tuple[list[_Choice], int | None, set[str] | None]:
        """Everything a chat request needs before generation (shared with /v1/responses): checks,
        the templated prompt, the grammar (compiled off the loop), the engine requests.
        -> (choices, top logprobs k or None, names of the offered tools or None)."""
        self._check_common(req)
        text = self._chat_prompt(req)
        prompts = [self._prompt_ids(text, "messages", chat=True)]
        if req.forced_tools:
            named = req.tool_choice.function.name if isinstance(req.tool_choice, p.NamedToolChoice) else None
            grammar = forced_call_grammar(req.tools, named, req.calls_parallel, self.tool_format, self.model.tokenizer)
        else:
            grammar = output_grammar(req)
        grammar = await self.compiled(grammar)
        k = (req.top_logprobs or 0) if req.logprobs else None
        tools = {t.function.name for t in req.tools or []} if req.tools_active else None
        # a format whose markers are special tokens needs them in the text to find the calls
        keep = False if tools and keeps_special_tokens(self.tool_format, self.model.tokenizer) else None
        choices = self._plan(req, prompts, req.completion_limit, req.n, lambda j, budget: sampling_params(
            req, j, budget, logprobs=k, grammar=grammar, skip_special_tokens=keep))
        return choices, k, tools

    def tool_calls(self, text: str, tools: set[str] | None, parallel: bool):
        """(content, calls) of a finished answer in the served tool-call format."""
        if tools is None:
            return text, []
        return parse_tool_calls(text, tools, self.tool_format, parallel)

    async def compiled(self, grammar: Any) -> Any:
        """A grammar compiled by the engine off this event loop (an engine without the hook, e.g. a
        test double, gets the spec as is)."""
        compile_ = getattr(self.engine, "compile_grammar", None)
        if grammar is None or compile_ is None:
            return grammar
        return await compile_(grammar)

    def _chat_choice(self, c: _Choice, o: "_Result", k: int | None, tools: set[str] | None,
                     req: p.ChatCompletionRequest) -> p.ChatChoice:
        with_ids = req.return_token_ids
        content, calls = self.tool_calls(o.text, tools, req.calls_parallel)
        message = p.AssistantMessage(
            content=content,
            tool_calls=[p.ToolCall(id=t.id, function=p.ToolCallFunction(name=t.name, arguments=t.arguments))
                        for t in calls] or None,
        )
        return p.ChatChoice(
            index=c.index,
            message=message,
            finish_reason="tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason,
            logprobs=chat_logprobs(o.logprobs, self._token_text(), k) if k is not None else None,
            token_ids=o.token_ids if with_ids else None,
        )

    def _chat_prompt(self, req: p.ChatCompletionRequest) -> str:
        messages = req.message_dicts()
        tok = self.model.tokenizer
        if not req.tools_active:
            return tok.apply_chat_template(messages)
        tool_dicts = [t.model_dump(exclude_none=True) for t in req.tools]
        template = getattr(tok, "chat_template", None) or ""
        if "tools" in template:  # the template renders the tools itself (Qwen, Hermes, Llama 3.1 ...)
            return tok.apply_chat_template(messages, tools=tool_dicts)
        system = {"role": "system", "content": tools_system_prompt(req.tools, self.tool_format)}
        if messages and messages[0]["role"] == "system":
            system["content"] = messages[0]["content"] + "\n\n" + system["content"]
            messages = messages[1:]
        return tok.apply_chat_template([system, *messages])

    def tokenize(self, req: p.TokenizeRequest) -> p.TokenizeResponse:
        self._check_model_field(req.model)
        tok = self.model.tokenizer
        if req.messages is not None:
            text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
            ids = tok.encode(text, add_special_tokens=False) if getattr(tok, "bos_token", None) and text.startswith(tok.bos_token) else tok.encode(text)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return p.TokenizeResponse(count=len(ids), max_model_len=self.model.max_model_len, tokens=ids)

    def detokenize(self, req: p.DetokenizeRequest) -> p.DetokenizeResponse:
        self._check_model_field(req.model)
        vocab = self.model.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return p.DetokenizeResponse(prompt=self.model.tokenizer.decode(req.tokens))

    def _check_model_field(self, model: str | None) -> None:
        if model is not None and model != self.model.name:
            raise ModelNotFound(model, self.model.name)

    def _token_text(self) -> TokenText:
        if self.token_text is None:
            raise InvalidRequest("logprobs are not available for this model's tokenizer", param="logprobs")
        return self.token_text

    # ---------------------------------------------------------------------------- validation

    def _check_common(self, req: p._SamplingFields) -> None:
        if req.model != self.model.name:
            raise ModelNotFound(req.model, self.model.name)
        if req.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}, got {req.n}", param="n")
        check_vocab(req, self.model.tokenizer.vocab_size)

    def _prompt_ids(self, prompt: str | list[int], param: str, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("The prompt is empty", param=param)
            tok = self.model.tokenizer
            # A chat template that writes the BOS text itself must not get a second BOS id.
            bos = getattr(tok, "bos_token", None)
            ids = tok.encode(prompt, add_special_tokens=not (chat and bos and prompt.startswith(bos)))
        else:
            ids = list(prompt)
            vocab = self.model.tokenizer.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(f"Token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        if not ids:
            raise InvalidRequest("The prompt is empty", param=param)
        limit = self.model.max_model_len
        if len(ids) >= limit:
            raise InvalidRequest(
                f"The prompt has {len(ids)} tokens; this model's context length is {limit}, "
                "which leaves no room for a completion",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def _plan(
        self,
        req: p._SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        per_prompt: int,
        make_params: Callable[[int, int], SamplingParams],
    ) -> list[_Choice]:
        if len(prompts) * per_prompt > self.settings.max_n:
            raise InvalidRequest(
                f"n (or best_of) × number of prompts must be at most {self.settings.max_n}, "
                f"got {len(prompts) * per_prompt}",
                param="n",
            )
        limit = self.model.max_model_len
        choices: list[_Choice] = []
        for pi, ids in enumerate(prompts):
            room = limit - len(ids)
            if max_tokens is not None and max_tokens > room:
                raise InvalidRequest(
                    f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                    f"context length of {limit}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            cap = self.settings.max_tokens_default  # None: until the context ends, as OpenAI and vLLM
            budget = max_tokens if max_tokens is not None else (room if cap is None else min(cap, room))
            for j in range(per_prompt):
                try:
                    params = make_params(j, budget)
                except RequestRejected as e:
                    raise InvalidRequest(str(e)) from e
                choices.append(_Choice(index=len(choices), prompt_index=pi, prompt_ids=ids, params=params))
        return choices

    # ---------------------------------------------------------------------------- generation

    def _generators(self, rid: str, choices: list[_Choice]) -> list[AsyncIterator[Any]]:
        return [self.engine.generate(f"{rid}-{c.index}", c.prompt_ids, c.params) for c in choices]

    def outputs(self, rid: str, choices: list[_Choice]) -> AsyncIterator[tuple[int, Any]]:
        """The engine outputs of every choice, merged as (choice index, output); closing it aborts them."""
        return _merge(self._generators(rid, choices))

    async def collect(self, rid: str, choices: list[_Choice], arrival: float | None = None) -> list["_Result"]:
        results = [_Result(c.prompt_index) for c in choices]
        timers = [self.metrics.request_timer(arrival) for _ in choices]
        failed = True
        try:
            async for i, out in self.outputs(rid, choices):
                results[i].add(out)
                timers[i].observe(out)
            failed = False
        finally:
            for t in timers:
                t.close(error=failed)
        self.count_tokens(choices, results)
        return results

    async def _stream(self, rid: str, req: p._SamplingFields, choices: list[_Choice], chunks: "_Chunks",
                      arrival: float | None) -> Response:
        events = self.outputs(rid, choices)
        # Wait for the first output before answering 200, so a request the engine refuses at
        # admission still gets a proper 4xx instead of an error inside a started stream.
        try:
            first = await anext(events, None)
        except BaseException:
            await events.aclose()
            raise
        results = [_Result(c.prompt_index) for c in choices]
        timers = [self.metrics.request_timer(arrival) for _ in choices]

        async def body() -> AsyncIterator[bytes]:
            failed = False
            try:
                for c in choices:
                    head = chunks.opening(c.index)
                    if head is not None:
                        yield p.sse_event(head)
                item = first
                while item is not None:
                    i, out = item
                    results[i].add(out)
                    timers[i].observe(out)
                    usage = _usage(choices, results) if req.continuous_usage else None
                    for chunk in chunks.delta(i, out, req.return_token_ids, usage):
                        yield p.sse_event(chunk)
                    item = await anext(events, None)
                self.count_tokens(choices, results)
                if req.include_usage_in_stream:
                    yield p.sse_event(chunks.usage(_usage(choices, results)))
            except Exception as exc:  # the stream has started: report in-band, then end it
                failed = True
                err = as_api_error(exc)
                self.metrics.count_stream_error(err.status)
                yield p.sse_event(err.body())
            finally:
                await events.aclose()
                for t in timers:  # a client gone mid-stream ends here too: its requests count as aborted
                    t.close(error=failed)
            yield p.SSE_DONE

        return ClosingStreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def count_tokens(self, choices: list[_Choice], results: list["_Result"]) -> None:
        self.metrics.count_tokens(*_token_totals(choices, results)[:2])


class _Result:
    def __init__(self, prompt_index: int) -> None:
        self.prompt_index = prompt_index
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.logprobs: list = []  # TokenLogprob per generated token, when asked
        self.prompt_logprobs: list | None = None

    def add(self, out: Any) -> None:
        self.text += out.new_text
        self.cached_tokens = getattr(out, "cached_tokens", 0)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(getattr(out, "logprobs", None) or [])
        if getattr(out, "prompt_logprobs", None) is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


def _best(choices: list[_Choice], results: list[_Result], n: int, candidates: int) -> list[tuple[_Choice, _Result]]:
    """best_of: per prompt, the n candidates with the highest cumulative log-probability."""
    pairs = list(zip(choices, results))
    if candidates == n:
        return pairs
    picked: list[tuple[_Choice, _Result]] = []
    for start in range(0, len(pairs), candidates):
        group = pairs[start : start + candidates]
        picked += sorted(group, key=lambda cr: cr[1].cumulative_logprob, reverse=True)[:n]
    return picked


class _Echo:
    """A completion's echo: the prompt text before the completion, its tokens' log-probabilities
    before the completion's (legacy shape, with text offsets across both)."""

    def __init__(self, server: OpenAIServer, req: p.CompletionRequest, prompts: list[list[int]], texts: list[str | None]) -> None:
        self.server, self.on, self.k = server, req.echo, req.logprobs
        self.prompts, self.texts = prompts, texts
        self.prompt_k = req.prompt_logprobs  # vLLM's prompt_logprobs, apart from the echo's

    def prompt_logprobs(self, result: "_Result") -> list[dict | None] | None:
        if self.prompt_k is None or result.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(list(result.prompt_logprobs), self.server._token_text(), self.prompt_k)

    def text(self, prompt_index: int) -> str:
        if not self.on:
            return ""
        text = self.texts[prompt_index]
        if text is None:
            text = self.server.model.tokenizer.decode(self.prompts[prompt_index])
        return text

    def logprobs(self, prompt_index: int, result: _Result) -> p.CompletionLogprobs:
        tt = self.server._token_text()
        out = p.CompletionLogprobs()
        offset = 0
        if self.on:
            ids = self.prompts[prompt_index]
            offset = first_prompt_entry(ids[0], tt, out)
            entries = [e if e is None or len(e.top) <= (self.k or 0) else dataclasses.replace(e, top=e.top[: self.k or 0])
                       for e in list(result.prompt_logprobs or [])[1:]]  # prompt_logprobs may have asked for more
            prompt_part, offset = completion_logprobs(entries, tt, offset)
            _extend(out, prompt_part)
            offset = max(offset, len(self.text(prompt_index)))
        gen, _ = completion_logprobs(result.logprobs, tt, offset)
        _extend(out, gen)
        return out


def _extend(out: p.CompletionLogprobs, part: p.CompletionLogprobs) -> None:
    out.tokens += part.tokens
    out.token_logprobs += part.token_logprobs
    out.top_logprobs += part.top_logprobs
    out.text_offset += part.text_offset


def _token_totals(choices: list[_Choice], results: list[_Result]) -> tuple[int, int, int]:
    """Prompt, completion and cached prompt tokens. Each prompt counts once however many choices
    it has; its cached tokens are those every one of its choices found in the prefix cache."""
    prompt = sum(len(ids) for ids in {c.prompt_index: c.prompt_ids for c in choices}.values())
    cached: dict[int, int] = {}
    for r in results:
        cached[r.prompt_index] = min(cached.get(r.prompt_index, r.cached_tokens), r.cached_tokens)
    return prompt, sum(len(r.token_ids) for r in results), sum(cached.values())


def _usage(choices: list[_Choice], results: list[_Result]) -> p.Usage:
    return p.Usage.of(*_token_totals(choices, results))


class _Chunks(Protocol):
    def opening(self, index: int) -> Any | None: ...

    def delta(self, index: int, out: Any, with_ids: bool, usage: p.Usage | None) -> list[Any]: ...

    def usage(self, usage: p.Usage) -> Any: ...


class _CompletionChunks:
    def __init__(self, rid: str, model: str, echo: _Echo, prompt_of: list[int]) -> None:
        self.rid, self.model, self.echo = rid, model, echo
        self.prompt_of = prompt_of  # choice index -> prompt index
        self.created = p.now()
        self._offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def opening(self, index: int) -> None:
        return None

    def delta(self, index: int, out: Any, with_ids: bool, usage: p.Usage | None) -> list[p.CompletionChunk]:
        lps = getattr(out, "logprobs", None)
        first = index not in self._offsets
        text = out.new_text
        logprobs = None
        if self.echo.k is not None:
            result = _Result(0)
            result.add(out)
            if first and self.echo.on:  # the prompt goes out with the first chunk
                pi = self.prompt_of[index]
                logprobs = self.echo.logprobs(pi, result)
                self._offsets[index] = len(self.echo.text(pi)) + len(text)
            else:
                offset = self._offsets.get(index, 0)
                logprobs, self._offsets[index] = completion_logprobs(lps or [], self.echo.server._token_text(), offset)
        elif first:
            self._offsets[index] = 0
        if first and self.echo.on:
            text = self.echo.text(self.prompt_of[index]) + text
        prompt_lps = None
        if getattr(out, "prompt_logprobs", None) is not None:  # once, with the first output
            result = _Result(0)
            result.add(out)
            prompt_lps = self.echo.prompt_logprobs(result)
        if not (text or out.finished or (with_ids and out.new_token_ids) or (logprobs and logprobs.tokens) or prompt_lps):
            return []
        choice = p.CompletionChoice(
            index=index,
            text=text,
            finish_reason=out.finish_reason if out.finished else None,
            logprobs=logprobs,
            prompt_logprobs=prompt_lps,
            token_ids=list(out.new_token_ids) if with_ids else None,
        )
        return [p.CompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[choice], usage=usage)]

    def usage(self, usage: p.Usage) -> p.CompletionChunk:
        return p.CompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage)


class _ChatChunks:
    def __init__(self, rid: str, model: str, server: OpenAIServer, k: int | None, tools: set[str] | None,
                 parallel: bool = True) -> None:
        self.rid, self.model, self.server, self.k = rid, model, server, k
        self.created = p.now()
        self.tools = tools
        self.parallel = parallel
        self._parsers: dict[int, StreamingToolParser] = {}

    def _chunk(self, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self, index: int) -> p.ChatCompletionChunk:
        """OpenAI's first chunk of every choice announces the role, with empty content."""
        return self._chunk([p.ChatChunkChoice(index=index, delta=p.ChatDelta(role="assistant", content=""))])

    def delta(self, index: int, out: Any, with_ids: bool, usage: p.Usage | None) -> list[p.ChatCompletionChunk]:
        text, calls = out.new_text, []
        if self.tools is not None:
            parser = self._parsers.setdefault(
                index, StreamingToolParser(self.tools, self.server.tool_format, self.parallel))
            text, calls = parser.feed(out.new_text)
            if out.finished:
                rest, more = parser.finish()
                text, calls = text + rest, calls + more
        lps = getattr(out, "logprobs", None)
        logprobs = chat_logprobs(lps or [], self.server._token_text(), self.k) if self.k is not None and lps else None
        finish = None
        if out.finished:
            made_calls = self.tools is not None and self._parsers[index].calls
            finish = "tool_calls" if made_calls and out.finish_reason == "stop" else out.finish_reason
        if not (text or calls or out.finished or logprobs or (with_ids and out.new_token_ids)):
            return []
        delta = p.ChatDelta(
            content=text or None,
            tool_calls=[
                p.ToolCallDelta(index=i, id=c.id, type="function",
                                function=p.ToolCallFunctionDelta(name=c.name, arguments=c.arguments))
                for i, c in calls
            ] or None,
        )
        choice = p.ChatChunkChoice(
            index=index,
            delta=delta,
            finish_reason=finish,
            logprobs=logprobs,
            token_ids=list(out.new_token_ids) if with_ids else None,
        )
        return [self._chunk([choice], usage)]

    def usage(self, usage: p.Usage) -> p.ChatCompletionChunk:
        return self._chunk([], usage)


# ---------------------------------------------------------------------------------------- app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Invalid Content-Length header")
        if int(declared) > limit:
            raise BodyTooLarge(limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


class RouteMetricsMiddleware:
    """Count every answered request by route and status (unknown paths share one label). Being the
    outermost, it also stamps the request's arrival, where every latency metric starts."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL] = self.metrics.clock()
        path = route_path(scope)
        route = path if path in KNOWN_ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(route, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def build_http_app(
    server: OpenAIServer, health: Callable[[], Awaitable[bool]] | None = None, admin: APIRouter | None = None,
    ready: Callable[[], Awaitable[dict]] | None = None, limits: GuardLimits | None = None,
) -> FastAPI:
    """The ASGI app of one replica: routes, OpenAI error bodies, auth, per-route counters.
    `admin`: the elastic admin routes (cluster/serve/admin_api.py), which check the admin keys themselves.
    `ready`: -> {"ready": bool, ...details} for /ready (degraded while a group has no live holder).
    `limits`: body deadline, admission and total deadline (cluster/serve/middleware/request_guard.py)."""
    app = FastAPI(title="moge-serve", summary="OpenAI-compatible API of one attention replica",
                  version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    install_handlers(app)
    install_docs_ui(app)
    own_keys: tuple[str, ...] = ()
    if admin is not None:
        app.include_router(admin)
        own_keys = (admin.prefix,)
    limit = server.settings.max_body_bytes

    @app.post("/v1/completions", openapi_extra=body_schema(p.CompletionRequest),
              responses={200: {"model": p.CompletionResponse, "description": "the completion, or an SSE stream of CompletionChunk"}})
    async def completions(request: Request) -> Response:
        req, ignored = parse_request(p.CompletionRequest, await read_body(request, limit))
        return report_ignored(await server.completions(req, arrival_of(request.scope)), ignored)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(p.ChatCompletionRequest),
              responses={200: {"model": p.ChatCompletionResponse, "description": "the completion, or an SSE stream of ChatCompletionChunk"}})
    async def chat_completions(request: Request) -> Response:
        req, ignored = parse_request(p.ChatCompletionRequest, await read_body(request, limit))
        return report_ignored(await server.chat(req, arrival_of(request.scope)), ignored)

    install_responses(app, server, read_body)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> Response:
        return JSONResponse(server.models().model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}", response_model=p.ModelCard)
    async def model(model_id: str) -> Response:
        return JSONResponse(server.model_card(model_id).model_dump(mode="json"))

    @app.post("/tokenize", openapi_extra=body_schema(p.TokenizeRequest), response_model=p.TokenizeResponse)
    async def tokenize(request: Request) -> Response:
        req, ignored = parse_request(p.TokenizeRequest, await read_body(request, limit))
        return report_ignored(JSONResponse(server.tokenize(req).model_dump(mode="json")), ignored)

    @app.post("/detokenize", openapi_extra=body_schema(p.DetokenizeRequest), response_model=p.DetokenizeResponse)
    async def detokenize(request: Request) -> Response:
        req, ignored = parse_request(p.DetokenizeRequest, await read_body(request, limit))
        return report_ignored(JSONResponse(server.detokenize(req).model_dump(mode="json")), ignored)

    @app.get("/health")
    async def healthy() -> Response:
        ok = True if health is None else await health()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def readiness() -> Response:
        """Readiness, unlike /health (liveness): 503 'degraded' while some expert group has no live
        holder (its steps wait for a failover), so a balancer can prefer another replica."""
        alive = True if health is None else await health()
        state = {"ready": alive} if ready is None else await ready()
        ok = alive and bool(state.get("ready"))
        body = {**state, "status": "ready" if ok else ("degraded" if alive else "unhealthy"), "ready": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    install_request_schemas(app)
    # Outermost last: counting sees the 401s that auth answers itself and every 500 (ErrorBoundary);
    # the guard runs after auth, so an unauthenticated client's body is never read.
    app.add_middleware(RequestGuard, limits=limits or GuardLimits(max_body_bytes=limit),
                       takes_body=post_route_matcher(app.router))
    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(server.settings.api_keys), own_keys_prefixes=own_keys)
    app.add_middleware(ErrorBoundary)
    app.add_middleware(RouteMetricsMiddleware, metrics=server.metrics)
    return app
