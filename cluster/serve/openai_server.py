"""The server half of the OpenAI API: what an attention replica does with one request, over an
async engine, as a stream of pieces (cluster/serve/ingress/pieces.py) that the ingress
(cluster/serve/ingress/) or Ray Serve LLM's own ingress (cluster/serve/app.py, server_cls) turns
into HTTP. Kept apart from Ray Serve so the whole surface also runs in one process over a fake
engine in unit tests. What this file decides:
- every client mistake is a 4xx in OpenAI's error shape (cluster/serve/errors.py), checked before
  any engine work starts; only then is the request admitted (429 past this replica's bound);
- n choices (× prompts) are n independent engine requests, merged into one stream;
- each piece carries the engine outputs behind its bytes, so a request resumed on another replica
  (`RequestContext.resume`) replays them into its formatter and continues each choice where it
  stopped; a stream the consumer closes aborts its engine requests and frees their KV blocks;
- latencies run from the request's arrival at the ingress (`RequestContext.arrival`, the time the
  client's TTFT starts) to what is handed out (cluster/serve/metrics/request_timer.py), and a stream
  that fell behind its engine requests sends what is waiting as one chunk per choice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from actors.engine.request_rejected import RequestRejected
from actors.engine.sampling_params import SamplingParams
from cluster.serve import openai_protocol as p
from cluster.serve.openai_params import (
    TokenText, chat_logprobs, check_vocab, completion_logprobs, first_prompt_entry, output_grammar, sampling_params,
    vllm_prompt_logprobs,
)
from cluster.serve.responses.protocol import ResponseRef, ResponsesRequest
from cluster.serve.responses.service import ResponsesService
from cluster.serve.responses.store import ResponseStore
from cluster.serve.streaming import merge_batches
from cluster.serve.tools.formats import choose_format, keeps_special_tokens, tools_system_prompt
from cluster.serve.tools.grammar import forced_call_grammar
from cluster.serve.tools.parsing import StreamingToolParser, parse_tool_calls
from cluster.config import ServerSection
from cluster.serve.errors import APIError, InvalidRequest, ModelNotFound, NotFound, Overloaded, as_api_error
from cluster.serve.ingress.pieces import Piece, RequestContext, json_piece
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.openapi_doc import IGNORED_HEADER, ignored_header, parse_request

log = logging.getLogger(__name__)

COLLECT_INTERVAL_S = 0.25  # progress pieces of a whole (non-stream) answer


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
        self, engine: GenerationEngine, model: ServedModel, settings: ServerSection, metrics: ReplicaMetrics,
        max_in_flight: int = 96,
    ) -> None:
        self.engine = engine
        self.model = model
        self.settings = settings
        self.metrics = metrics
        decode = getattr(model.tokenizer, "decode", None)
        self.token_text = TokenText(decode) if decode is not None else None
        self.tool_format = choose_format(settings.tool_call_parser, model.tokenizer, model.family)
        # admission: sequences (max(n, best_of) x prompts) of unfinished requests on this replica
        self.max_in_flight = max_in_flight
        self.retry_after_s = settings.retry_after_s
        self.in_flight = 0
        self.responses_api = ResponsesService(self, ResponseStore(settings.responses_max_stored,
                                                                  settings.responses_max_stored_bytes))

    # ------------------------------------------------------------------------- the server half

    async def run(self, route: str, body: Any, ctx: RequestContext | None = None) -> AsyncIterator[Piece]:
        """One request to `route` with its parsed JSON `body`, answered as pieces: the only method
        the ingress calls. Errors become an error piece (before anything was sent) or an in-band
        SSE error event (inside a started stream); nothing raises out of here."""
        ctx = ctx or RequestContext()
        sent = False
        try:
            for path, model, method in ROUTES:
                if path == route:
                    break
            else:
                raise NotFound("Unknown route", code="unknown_url")
            req, ignored = parse_request(model, body)
            async for piece in getattr(self, method)(req, ctx):
                if not sent and ignored:
                    piece.headers = {**(piece.headers or {}), IGNORED_HEADER: ignored_header(ignored)}
                sent = True
                yield piece
        except Exception as exc:  # noqa: BLE001 - every failure is an answer
            yield error_piece(as_api_error(exc))

    def model_info(self) -> dict:
        return {"name": self.model.name, "max_model_len": self.model.max_model_len}

    @contextmanager
    def _admitted(self, choices: list["_Choice"], ctx: RequestContext) -> Iterator[None]:
        """Admit only while this replica's sequences fit its bound (429 with Retry-After beyond:
        a bounded waiting queue instead of unbounded TTFT). A resumed request was admitted once and
        is not refused again. A request larger than the whole bound waits for an empty replica."""
        seqs = min(len(choices), self.max_in_flight)
        if ctx.resume is None and self.in_flight + seqs > self.max_in_flight:
            raise Overloaded(f"This replica is at its limit of {self.max_in_flight} sequences in flight; "
                             f"retry after {self.retry_after_s}s", self.retry_after_s)
        self.in_flight += seqs
        try:
            yield
        finally:
            self.in_flight -= seqs

    # ------------------------------------------------------------------------------------ routes

    def models(self) -> p.ModelList:
        return p.ModelList(data=[self.model_card()])

    def model_card(self, model_id: str | None = None) -> p.ModelCard:
        if model_id is not None and model_id != self.model.name:
            raise ModelNotFound(model_id, self.model.name)
        return p.ModelCard(id=self.model.name, max_model_len=self.model.max_model_len)

    async def completions(self, req: p.CompletionRequest, ctx: RequestContext) -> AsyncIterator[Piece]:
        self._check_common(req, ctx)
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
        rid = "cmpl-" + ctx.id_suffix
        echo = _Echo(self, req, prompts, texts)
        chunks = lambda: _CompletionChunks(rid, self.model.name, echo, [c.prompt_index for c in choices], ctx.created)  # noqa: E731
        outs: list[_Result] = []
        async for piece in self._respond(rid, req, choices, ctx, chunks, outs):
            yield piece
        if req.stream:
            return
        picked = _best(choices, outs, req.n, candidates)
        yield json_piece(
            p.CompletionResponse(
                id=rid,
                created=ctx.created,
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
            )
        )

    async def chat(self, req: p.ChatCompletionRequest, ctx: RequestContext) -> AsyncIterator[Piece]:
        choices, k, tools = await self.chat_plan(req, ctx)
        rid = "chatcmpl-" + ctx.id_suffix
        outs: list[_Result] = []
        async for piece in self._respond(rid, req, choices, ctx, lambda: _ChatChunks(
                rid, self.model.name, self, k, tools, ctx.created, req.calls_parallel), outs):
            yield piece
        if req.stream:
            return
        yield json_piece(
            p.ChatCompletionResponse(
                id=rid,
                created=ctx.created,
                model=self.model.name,
                choices=[self._chat_choice(c, o, k, tools, req) for c, o in zip(choices, outs)],
                usage=_usage(choices, outs),
            )
        )

    async def chat_plan(self, req: p.ChatCompletionRequest,
                        ctx: RequestContext) -> tuple[list[_Choice], int | None, set[str] | None]:
        """Everything a chat request needs before generation (shared with /v1/responses): checks,
        the templated prompt, the grammar (compiled off the loop), the engine requests.
        -> (choices, top logprobs k or None, names of the offered tools or None)."""
        self._check_common(req, ctx)
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
            token_ids=o.token_ids if req.return_token_ids else None,
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

    def responses(self, req: ResponsesRequest, ctx: RequestContext) -> AsyncIterator[Piece]:
        return self.responses_api.create(req, ctx)

    def response_retrieve(self, ref: ResponseRef, ctx: RequestContext) -> AsyncIterator[Piece]:
        return self.responses_api.retrieve(ref, ctx)

    def response_delete(self, ref: ResponseRef, ctx: RequestContext) -> AsyncIterator[Piece]:
        return self.responses_api.delete(ref, ctx)

    def response_cancel(self, ref: ResponseRef, ctx: RequestContext) -> AsyncIterator[Piece]:
        return self.responses_api.cancel(ref, ctx)

    async def tokenize_route(self, req: p.TokenizeRequest, ctx: RequestContext) -> AsyncIterator[Piece]:
        yield json_piece(self.tokenize(req))

    async def detokenize_route(self, req: p.DetokenizeRequest, ctx: RequestContext) -> AsyncIterator[Piece]:
        yield json_piece(self.detokenize(req))

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

    def _check_common(self, req: p._SamplingFields, ctx: RequestContext) -> None:
        if req.model != self.model.name:
            raise ModelNotFound(req.model, self.model.name)
        if req.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}, got {req.n}", param="n")
        check_vocab(req, self.model.tokenizer.vocab_size)
        if req.seed is None:  # the ingress's seed: a resumed sampled choice draws what it would have
            req.seed = ctx.seed

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

    def _generators(self, rid: str, choices: list[_Choice], ctx: RequestContext) -> dict[int, AsyncIterator[Any]]:
        """One engine stream per unfinished choice; a resumed choice continues after its tokens."""
        resume = ctx.resume
        gens: dict[int, AsyncIterator[Any]] = {}
        for c in choices:
            if resume is None or not resume.outputs.get(c.index):
                gens[c.index] = self.engine.generate(f"{rid}-{c.index}", c.prompt_ids, c.params)
            elif not resume.finished(c.index):
                params = c.params
                if params.prompt_logprobs is not None:  # already sent with the first output
                    params = _without_prompt_logprobs(params)
                gens[c.index] = self.engine.generate(f"{rid}-{c.index}", c.prompt_ids, params,
                                                     generated=resume.tokens(c.index))
        return gens

    def _replayed(self, choices: list[_Choice], ctx: RequestContext) -> list[tuple[int, Any]]:
        """What the client already has (a resume), in the order it was sent."""
        if ctx.resume is None:
            return []
        return [(c.index, out) for c in choices for out in ctx.resume.outputs.get(c.index, ())]

    def _respond(self, rid: str, req: p._SamplingFields, choices: list[_Choice], ctx: RequestContext,
                 chunks: Callable[[], "_Chunks"], results: list["_Result"]) -> AsyncIterator[Piece]:
        """The whole stream's pieces, or a whole answer's progress pieces (filling `results`; the
        caller then yields the body)."""
        if req.stream:
            return self.stream_events(rid, choices, _ChunkEvents(chunks(), req, choices), ctx)
        return self.collect_pieces(rid, choices, ctx, results)

    def _timers(self, choices: list[_Choice], ctx: RequestContext) -> list[Any]:
        """One RequestTimer per choice, from the ingress's arrival; a resumed choice's client had
        its first token from the lost replica, so its TTFT is not taken again."""
        arrival = ctx.local_arrival(self.metrics.clock)
        timers = [self.metrics.request_timer(arrival) for _ in choices]
        if ctx.resume is not None:
            for c in choices:
                if ctx.resume.tokens(c.index):
                    timers[c.index].resumed()
        return timers

    async def collect_pieces(self, rid: str, choices: list[_Choice], ctx: RequestContext,
                       results: list["_Result"]) -> AsyncIterator[Piece]:
        """Fill `results`, yielding progress-only pieces (nothing for the client until the end)."""
        results[:] = [_Result(c.prompt_index) for c in choices]
        for i, out in self._replayed(choices, ctx):
            results[i].add(out)
        timers = self._timers(choices, ctx)
        failed = True
        try:
            with self._admitted(choices, ctx):
                # progress only serves a resume: a few messages a second are enough
                async for batch in merge_batches(self._generators(rid, choices, ctx), COLLECT_INTERVAL_S):
                    for i, out in batch:
                        results[i].add(out)
                        timers[i].observe(out)
                    yield Piece(progress=batch)
            failed = False
        finally:
            for t in timers:
                t.close(error=failed)
        self._count_tokens(choices, results)

    async def stream_events(self, rid: str, choices: list[_Choice], events: "StreamEvents",
                      ctx: RequestContext) -> AsyncIterator[Piece]:
        """A stream's pieces: each batch of engine outputs as the events `events` makes of them, as
        soon as it arrives; then a last piece with the stream's end (usage, [DONE] or its own)."""
        results = [_Result(c.prompt_index) for c in choices]
        resume = ctx.resume
        head = events.opening()  # dropped below if the client has it: its state counts all the same
        for i, out in self._replayed(choices, ctx):  # the formatter's state as the client saw it
            results[i].add(out)
            events.delta(i, out, results)
        timers = self._timers(choices, ctx)
        with self._admitted(choices, ctx):
            batches = merge_batches(self._generators(rid, choices, ctx), self.settings.stream_interval_ms / 1000)
            # Wait for the first output before answering 200, so a request the engine refuses at
            # admission still gets a proper 4xx instead of an error inside a started stream.
            try:
                first = await anext(batches, None)
            except BaseException:
                await batches.aclose()
                for t in timers:
                    t.close(error=True)
                raise
            if resume is not None and resume.opened:
                head = b""
            batch = first
            failed = False
            try:
                while batch is not None:
                    data = bytearray(head)
                    head = b""
                    for i, out in batch:
                        results[i].add(out)
                        timers[i].observe(out)
                        data += events.delta(i, out, results)
                    yield Piece(bytes(data), progress=batch, stream=True)
                    batch = await anext(batches, None)
                self._count_tokens(choices, results)
                yield Piece(head + events.end(results), stream=True, final=True)
            except Exception as exc:  # the stream has started: report in-band, then end it
                failed = True
                err = as_api_error(exc)
                yield Piece(events.error(err), stream=True, final=True, error_status=err.status)
            finally:
                await batches.aclose()
                for t in timers:  # a consumer gone mid-stream ends here too: its requests count as aborted
                    t.close(error=failed)

    def _count_tokens(self, choices: list[_Choice], results: list["_Result"]) -> None:
        self.metrics.count_tokens(*_token_totals(choices, results)[:2])


class _Result:
    def __init__(self, prompt_index: int) -> None:
        self.prompt_index = prompt_index
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0
        self.outputs = 0
        self.logprobs: list = []  # TokenLogprob per generated token, when asked
        self.prompt_logprobs: list | None = None

    def add(self, out: Any) -> None:
        if not self.outputs:  # fixed at first admission; a continuation elsewhere reports its own
            self.cached_tokens = getattr(out, "cached_tokens", 0)
        self.outputs += 1
        self.text += out.new_text
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


class StreamEvents(Protocol):
    """What a stream sends, as bytes: its opening, the events of each output (also called, output
    discarded, for the outputs a resumed stream's client already has), its end, an in-band error."""

    def opening(self) -> bytes: ...

    def delta(self, index: int, out: Any, results: list[_Result]) -> bytes: ...

    def end(self, results: list[_Result]) -> bytes: ...

    def error(self, err: APIError) -> bytes: ...


class _ChunkEvents:
    """The chat and completion streams: one SSE `data:` event per chunk, then usage and [DONE]."""

    def __init__(self, chunks: _Chunks, req: p._SamplingFields, choices: list[_Choice]) -> None:
        self.chunks, self.req, self.choices = chunks, req, choices

    def opening(self) -> bytes:
        openings = (self.chunks.opening(c.index) for c in self.choices)
        return b"".join(p.sse_event(o) for o in openings if o is not None)

    def delta(self, index: int, out: Any, results: list[_Result]) -> bytes:
        usage = _usage(self.choices, results) if self.req.continuous_usage else None
        return b"".join(p.sse_event(c) for c in self.chunks.delta(index, out, self.req.return_token_ids, usage))

    def end(self, results: list[_Result]) -> bytes:
        usage = p.sse_event(self.chunks.usage(_usage(self.choices, results))) if self.req.include_usage_in_stream else b""
        return usage + p.SSE_DONE

    def error(self, err: APIError) -> bytes:
        return p.sse_event(err.body()) + p.SSE_DONE


class _CompletionChunks:
    def __init__(self, rid: str, model: str, echo: _Echo, prompt_of: list[int], created: int) -> None:
        self.rid, self.model, self.echo = rid, model, echo
        self.prompt_of = prompt_of  # choice index -> prompt index
        self.created = created
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
                 created: int, parallel: bool = True) -> None:
        self.rid, self.model, self.server, self.k = rid, model, server, k
        self.created = created
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


# ------------------------------------------------------------------------------ pieces and routes


def error_piece(err: APIError) -> Piece:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    headers.update(err.headers or {})
    return json_piece(err.body(), err.status, headers or None)


def _without_prompt_logprobs(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, prompt_logprobs=None)


# (path, request model, OpenAIServer method): what `run` serves; a new route is one more line here
# and one in the ingress's route table (cluster/serve/ingress/http_app.py)
ROUTES: tuple[tuple[str, type, str], ...] = (
    ("/v1/completions", p.CompletionRequest, "completions"),
    ("/v1/chat/completions", p.ChatCompletionRequest, "chat"),
    ("/tokenize", p.TokenizeRequest, "tokenize_route"),
    ("/detokenize", p.DetokenizeRequest, "detokenize_route"),
    ("/v1/responses", ResponsesRequest, "responses"),
    # GET, DELETE /v1/responses/{id} and POST .../cancel: the id in the body
    ("responses.retrieve", ResponseRef, "response_retrieve"),
    ("responses.delete", ResponseRef, "response_delete"),
    ("responses.cancel", ResponseRef, "response_cancel"),
)
