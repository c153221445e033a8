"""The OpenAI routes of an attention replica, as a plain FastAPI app over an async engine.

Kept apart from Ray Serve (cluster/serve/app.py) so the whole HTTP surface can also run in one
process over a fake engine in unit tests. What this file decides:
- a request body is read with a byte limit *before* it is parsed (413), then validated strictly;
- every client mistake is a 4xx in OpenAI's error shape (cluster/serve/errors.py), checked before any
  engine work starts;
- n choices (× prompts) are n independent engine requests, merged into one stream;
- a streamed response closes its generators when the client goes away, which makes the engine
  abort those requests and free their KV blocks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.engine.sampling_params import SamplingParams
from cluster.serve import openai_protocol as p
from cluster.serve.auth import ApiKeyMiddleware, ApiKeys
from cluster.config import ServerSection
from cluster.serve.errors import BodyTooLarge, InvalidRequest, ModelNotFound, as_api_error, install_handlers
from cluster.serve.metrics import CONTENT_TYPE, ReplicaMetrics

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                "/admin/status", "/admin/scale", "/admin/migrate")


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

    # ------------------------------------------------------------------------------------ routes

    def models(self) -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=self.model.name, max_model_len=self.model.max_model_len)])

    async def completions(self, req: p.CompletionRequest) -> Response:
        self._check_common(req)
        prompts = [self._prompt_ids(x, "prompt") for x in req.prompts()]
        choices = self._plan(req, prompts, req.max_tokens)
        rid = p.new_id("cmpl")
        if req.stream:
            return await self._stream(rid, req, choices, _CompletionChunks(rid, self.model.name))
        outs = await self._collect(rid, choices)
        return JSONResponse(
            p.CompletionResponse(
                id=rid,
                model=self.model.name,
                choices=[
                    p.CompletionChoice(
                        index=c.index,
                        text=o.text,
                        finish_reason=o.finish_reason,
                        token_ids=o.token_ids if req.return_token_ids else None,
                    )
                    for c, o in zip(choices, outs)
                ],
                usage=_usage(choices, outs),
            ).model_dump(mode="json")
        )

    async def chat(self, req: p.ChatCompletionRequest) -> Response:
        self._check_common(req)
        text = self.model.tokenizer.apply_chat_template(req.message_dicts())
        prompts = [self._prompt_ids(text, "messages", chat=True)]
        choices = self._plan(req, prompts, req.completion_limit)
        rid = p.new_id("chatcmpl")
        if req.stream:
            return await self._stream(rid, req, choices, _ChatChunks(rid, self.model.name))
        outs = await self._collect(rid, choices)
        return JSONResponse(
            p.ChatCompletionResponse(
                id=rid,
                model=self.model.name,
                choices=[
                    p.ChatChoice(
                        index=c.index,
                        message=p.AssistantMessage(content=o.text),
                        finish_reason=o.finish_reason,
                        token_ids=o.token_ids if req.return_token_ids else None,
                    )
                    for c, o in zip(choices, outs)
                ],
                usage=_usage(choices, outs),
            ).model_dump(mode="json")
        )

    # ---------------------------------------------------------------------------- validation

    def _check_common(self, req: p._SamplingFields) -> None:
        if req.model != self.model.name:
            raise ModelNotFound(req.model, self.model.name)
        if req.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}, got {req.n}", param="n")

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

    def _plan(self, req: p._SamplingFields, prompts: list[list[int]], max_tokens: int | None) -> list[_Choice]:
        if len(prompts) * req.n > self.settings.max_n:
            raise InvalidRequest(
                f"n × number of prompts must be at most {self.settings.max_n}, got {len(prompts) * req.n}",
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
            budget = max_tokens if max_tokens is not None else min(self.settings.max_tokens_default, room)
            for j in range(req.n):
                params = SamplingParams(
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=max(0, req.top_k or 0),
                    # distinct but reproducible choices when a seed is given
                    seed=None if req.seed is None else req.seed + j,
                    max_tokens=budget,
                    stop=req.stop_list,
                    ignore_eos=req.ignore_eos,
                )
                choices.append(_Choice(index=len(choices), prompt_index=pi, prompt_ids=ids, params=params))
        return choices

    # ---------------------------------------------------------------------------- generation

    def _generators(self, rid: str, choices: list[_Choice]) -> list[AsyncIterator[Any]]:
        return [self.engine.generate(f"{rid}-{c.index}", c.prompt_ids, c.params) for c in choices]

    async def _collect(self, rid: str, choices: list[_Choice]) -> list["_Result"]:
        results = [_Result(c.prompt_index) for c in choices]
        timers = [self.metrics.token_timer() for _ in choices]
        async for i, out in _merge(self._generators(rid, choices)):
            results[i].add(out)
            timers[i].tokens(len(out.new_token_ids))
        self._count_tokens(choices, results)
        return results

    async def _stream(self, rid: str, req: p._SamplingFields, choices: list[_Choice], chunks: "_Chunks") -> Response:
        events = _merge(self._generators(rid, choices))
        # Wait for the first output before answering 200, so a request the engine refuses at
        # admission still gets a proper 4xx instead of an error inside a started stream.
        try:
            first = await anext(events, None)
        except BaseException:
            await events.aclose()
            raise
        results = [_Result(c.prompt_index) for c in choices]
        timers = [self.metrics.token_timer() for _ in choices]

        async def body() -> AsyncIterator[bytes]:
            try:
                for c in choices:
                    head = chunks.opening(c.index)
                    if head is not None:
                        yield p.sse_event(head)
                item = first
                while item is not None:
                    i, out = item
                    results[i].add(out)
                    timers[i].tokens(len(out.new_token_ids))
                    if out.new_text or out.finished or (req.return_token_ids and out.new_token_ids):
                        yield p.sse_event(chunks.delta(i, out, req.return_token_ids))
                    item = await anext(events, None)
                self._count_tokens(choices, results)
                if req.include_usage_in_stream:
                    yield p.sse_event(chunks.usage(_usage(choices, results)))
            except Exception as exc:  # the stream has started: report in-band, then end it
                yield p.sse_event(as_api_error(exc).body())
            finally:
                await events.aclose()
            yield p.SSE_DONE

        return ClosingStreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _count_tokens(self, choices: list[_Choice], results: list["_Result"]) -> None:
        self.metrics.count_tokens(*_token_totals(choices, results)[:2])


class _Result:
    def __init__(self, prompt_index: int) -> None:
        self.prompt_index = prompt_index
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0

    def add(self, out: Any) -> None:
        self.text += out.new_text
        self.cached_tokens = getattr(out, "cached_tokens", 0)
        self.token_ids.extend(out.new_token_ids)
        if out.finished:
            self.finish_reason = out.finish_reason


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

    def delta(self, index: int, out: Any, with_ids: bool) -> Any: ...

    def usage(self, usage: p.Usage) -> Any: ...


class _CompletionChunks:
    def __init__(self, rid: str, model: str) -> None:
        self.rid, self.model = rid, model
        self.created = p.now()

    def opening(self, index: int) -> None:
        return None

    def delta(self, index: int, out: Any, with_ids: bool) -> p.CompletionChunk:
        choice = p.CompletionChoice(
            index=index,
            text=out.new_text,
            finish_reason=out.finish_reason if out.finished else None,
            token_ids=list(out.new_token_ids) if with_ids else None,
        )
        return p.CompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[choice])

    def usage(self, usage: p.Usage) -> p.CompletionChunk:
        return p.CompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[], usage=usage)


class _ChatChunks:
    def __init__(self, rid: str, model: str) -> None:
        self.rid, self.model = rid, model
        self.created = p.now()

    def _chunk(self, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self, index: int) -> p.ChatCompletionChunk:
        """OpenAI's first chunk of every choice announces the role, with empty content."""
        return self._chunk([p.ChatChunkChoice(index=index, delta=p.ChatDelta(role="assistant", content=""))])

    def delta(self, index: int, out: Any, with_ids: bool) -> p.ChatCompletionChunk:
        choice = p.ChatChunkChoice(
            index=index,
            delta=p.ChatDelta(content=out.new_text or None),
            finish_reason=out.finish_reason if out.finished else None,
            token_ids=list(out.new_token_ids) if with_ids else None,
        )
        return self._chunk([choice])

    def usage(self, usage: p.Usage) -> p.ChatCompletionChunk:
        return self._chunk([], usage)


async def _merge(gens: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several engine streams as (index, output), in arrival order.

    Closing the merged stream (client gone, error) cancels every pump task; cancellation raises
    inside each engine generator, whose cleanup aborts its request.
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[Any]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            queue.put_nowait((i, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            queue.put_nowait((i, done))
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClosingStreamingResponse(StreamingResponse):
    """Starlette stops iterating a body when the client disconnects but never closes it; closing
    here runs the generator's cleanup (engine abort) now instead of at garbage collection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


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
    """Count every answered request by route and status (unknown paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path if path in KNOWN_ROUTES else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(route, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def build_http_app(
    server: OpenAIServer, health: Callable[[], Awaitable[bool]] | None = None, admin: APIRouter | None = None
) -> FastAPI:
    """The ASGI app of one replica: routes, OpenAI error bodies, auth, per-route counters.
    `admin`: the elastic admin routes (cluster/serve/admin_api.py), which check the admin keys themselves."""
    app = FastAPI(title="moge", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    own_keys: tuple[str, ...] = ()
    if admin is not None:
        app.include_router(admin)
        own_keys = (admin.prefix,)
    limit = server.settings.max_body_bytes

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, limit)
        return await server.completions(p.CompletionRequest.model_validate_json(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, limit)
        return await server.chat(p.ChatCompletionRequest.model_validate_json(body))

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(server.models().model_dump(mode="json"))

    @app.get("/health")
    async def healthy() -> Response:
        ok = True if health is None else await health()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    # Outermost last: counting sees the 401s that auth answers itself.
    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(server.settings.api_keys), own_keys_prefixes=own_keys)
    app.add_middleware(RouteMetricsMiddleware, metrics=server.metrics)
    return app
