"""The ingress's ASGI app: the OpenAI routes, /health, /ready, /metrics and the admin routes, in
front of a backend that reaches the server half (cluster/serve/ingress/backend.py).

Middlewares, outermost first: per-route counters (every answered status, disconnects apart), the
500 boundary, keys (API keys; the admin keys for /admin, checked before any body is read), the
request guard (415, bodies read under a deadline and per-client / total caps, 413, parsed once with a
bounded depth, n/best_of checked; 504 past the total deadline). The routes then hand the parsed body
to the backend through `answer` (cluster/serve/ingress/resume.py), which resumes a request on
another replica if its replica dies. Generation is admitted by the replica (429), after validation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.serve import openai_protocol as p
from cluster.serve.errors import APIError, ErrorBoundary, install_handlers
from cluster.serve.ingress.backend import LocalBackend
from cluster.serve.ingress.pieces import Piece, RequestContext
from cluster.serve.ingress.resume import ReplicaUnavailable, ReplicaWatch, answer
from cluster.serve.metrics.replica import CONTENT_TYPE, ReplicaMetrics
from cluster.serve.middleware.auth import ApiKeyMiddleware, ApiKeys
from cluster.serve.middleware.request_guard import PARSED_BODY, GuardLimits, RequestGuard, post_route_matcher
from cluster.serve.middleware.scope import ARRIVAL, arrival_of, route_path
from cluster.serve.openapi_doc import body_schema, install_docs_ui, install_request_schemas
from cluster.serve.responses.protocol import ResponseObject, ResponsesRequest
from cluster.serve.streaming import ClosingStreamingResponse

log = logging.getLogger(__name__)

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics",
                "/admin/status", "/admin/scale", "/admin/migrate", "/tokenize", "/detokenize",
                "/openapi.json", "/docs", "/redoc", "/v1/responses")


class Front:
    """What the routes share: the backend, the replica watch, the resume window, the counters."""

    def __init__(self, backend: Any, metrics: ReplicaMetrics, settings: Any, watch: ReplicaWatch | None = None) -> None:
        self.backend = backend
        self.metrics = metrics
        self.settings = settings
        self.watch = watch or ReplicaWatch(lambda: backend.call("check_ready"))
        self._model: dict | None = None

    async def model_info(self) -> dict:
        if self._model is None:
            self._model = await self.backend.call("model_info")
        return self._model

    async def generate(self, route: str, request: Request, body: Any = None) -> Response:
        """One request to the server half, resumed elsewhere if its replica dies. `body`: for routes
        without one (what the path names), else the body the guard parsed."""
        if body is None:
            body = request.scope.get(PARSED_BODY)
        if body is None:  # not through the guard (it parses every POST): read here, same bounds
            from cluster.serve.ingress.json_body import loads_bounded

            body = loads_bounded(await request.body())
        retry = self.settings.retry_after_s
        self.watch.start()
        if not self.watch.serving:
            raise ReplicaUnavailable(f"no attention replica is serving; retry after {retry}s", retry)
        ctx = RequestContext.arriving(arrival_of(request.scope), self.metrics.clock)
        pieces = answer(lambda ctx: self.backend.pieces(route, body, ctx), ctx,
                        window_s=self.settings.resume_window_s, retry_after_s=retry,
                        on_resume=self.metrics.count_resume)
        try:
            first = await anext(pieces)
        except ReplicaUnavailable:
            self.watch.lost()
            await pieces.aclose()
            raise
        except BaseException:
            await pieces.aclose()
            raise
        if not first.stream:
            return await self._whole(first, pieces)
        return ClosingStreamingResponse(self._events(first, pieces), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", **(first.headers or {})})

    async def _whole(self, piece: Piece, pieces: AsyncIterator[Piece]) -> Response:
        headers = dict(piece.headers or {})
        try:
            while not piece.final:
                piece = await anext(pieces)
                headers.update(piece.headers or {})
        except ReplicaUnavailable:
            self.watch.lost()
            raise
        finally:
            await pieces.aclose()
        return Response(piece.data, status_code=piece.status, headers=headers or None, media_type="application/json")

    async def _events(self, first: Piece, pieces: AsyncIterator[Piece]) -> AsyncIterator[bytes]:
        piece, ended = first, False
        try:
            while True:
                if piece.error_status is not None:
                    self.metrics.count_stream_error(piece.error_status)
                yield piece.data
                if piece.final:
                    ended = True
                    return
                piece = await anext(pieces)
        except ReplicaUnavailable as err:  # no live replica to resume on: say so in band, then end
            ended = True
            self.watch.lost()
            self.metrics.count_stream_error(err.status)
            yield p.sse_event(err.body()) + p.SSE_DONE
        except Exception:
            ended = True  # a bug, logged by ErrorBoundary: not the client's leaving
            raise
        finally:
            if not ended:  # closed before its end: the client left mid-stream
                self.metrics.count_disconnect("response")
            await pieces.aclose()


class RouteMetricsMiddleware:
    """Count every answered request by route and status (unknown paths share one label); a client
    that left before its answer is a disconnect, by phase, never a status. Being the outermost, it
    also stamps the request's arrival."""

    def __init__(self, app: ASGIApp, metrics: ReplicaMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL] = self.metrics.clock()  # where every latency metric starts (RequestContext.arrival)
        path = route_path(scope)
        route = path if path in KNOWN_ROUTES else "other"

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count_request(route, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except asyncio.CancelledError:  # Serve cancels a request whose client left
            if not started:
                self.metrics.count_disconnect("body")
            raise


def build_http_app(
    server: Any, health: Callable[[], Awaitable[bool]] | None = None, admin: APIRouter | None = None,
    ready: Callable[[], Awaitable[dict]] | None = None, limits: GuardLimits | None = None,
    *, metrics: ReplicaMetrics | None = None, settings: Any = None, admin_keys: ApiKeys | None = None,
    watch: ReplicaWatch | None = None,
) -> FastAPI:
    """The ingress app. `server`: a backend (cluster/serve/ingress/backend.py), or an OpenAIServer to
    run in this process (then its metrics and settings are the app's, and `limits` set its admission).
    `admin`: the elastic admin routes (cluster/serve/admin_api.py), authenticated with `admin_keys`
    before their body is read. `ready`: -> {"ready": bool, ...} for /ready. `health`: extra liveness
    check (the in-process engine's step thread)."""
    if hasattr(server, "run"):  # an OpenAIServer in this process
        backend: Any = LocalBackend(server)
        watch = watch or ReplicaWatch(lambda: backend.call("check_ready"), period_s=0)  # nothing to lose
        metrics = metrics or server.metrics
        settings = settings or server.settings
        if limits is not None:
            server.max_in_flight, server.retry_after_s = limits.max_in_flight, limits.retry_after_s
    else:
        backend = server
    assert metrics is not None and settings is not None
    front = Front(backend, metrics, settings, watch)
    app = FastAPI(title="moge-serve", summary="OpenAI-compatible API of moge-serve",
                  version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.front = front
    install_handlers(app)
    install_docs_ui(app)
    own_keys: dict[str, ApiKeys] = {}
    if admin is not None:
        app.include_router(admin)
        own_keys[admin.prefix] = admin_keys if admin_keys is not None else ApiKeys(settings.admin_keys)

    @app.post("/v1/completions", openapi_extra=body_schema(p.CompletionRequest),
              responses={200: {"model": p.CompletionResponse, "description": "the completion, or an SSE stream of CompletionChunk"}})
    async def completions(request: Request) -> Response:
        return await front.generate("/v1/completions", request)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(p.ChatCompletionRequest),
              responses={200: {"model": p.ChatCompletionResponse, "description": "the completion, or an SSE stream of ChatCompletionChunk"}})
    async def chat_completions(request: Request) -> Response:
        return await front.generate("/v1/chat/completions", request)

    @app.post("/v1/responses", openapi_extra=body_schema(ResponsesRequest),
              responses={200: {"model": ResponseObject, "description": "the response, or an SSE stream of Responses events"}})
    async def create_response(request: Request) -> Response:
        return await front.generate("/v1/responses", request)

    # stored responses live in the memory of the replica that made them (cluster/serve/responses/store.py)
    @app.get("/v1/responses/{response_id}", response_model=ResponseObject)
    async def retrieve_response(response_id: str, request: Request) -> Response:
        return await front.generate("responses.retrieve", request, {"response_id": response_id})

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> Response:
        return await front.generate("responses.delete", request, {"response_id": response_id})

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str, request: Request) -> Response:
        return await front.generate("responses.cancel", request, {"response_id": response_id})

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> Response:
        info = await front.model_info()
        card = p.ModelCard(id=info["name"], max_model_len=info["max_model_len"])
        return JSONResponse(p.ModelList(data=[card]).model_dump(mode="json"))

    @app.get("/v1/models/{model_id:path}", response_model=p.ModelCard)
    async def model(model_id: str) -> Response:
        from cluster.serve.errors import ModelNotFound

        info = await front.model_info()
        if model_id != info["name"]:
            raise ModelNotFound(model_id, info["name"])
        return JSONResponse(p.ModelCard(id=info["name"], max_model_len=info["max_model_len"]).model_dump(mode="json"))

    @app.post("/tokenize", openapi_extra=body_schema(p.TokenizeRequest), response_model=p.TokenizeResponse)
    async def tokenize(request: Request) -> Response:
        return await front.generate("/tokenize", request)

    @app.post("/detokenize", openapi_extra=body_schema(p.DetokenizeRequest), response_model=p.DetokenizeResponse)
    async def detokenize(request: Request) -> Response:
        return await front.generate("/detokenize", request)

    async def alive() -> bool:
        front.watch.start()
        return front.watch.serving and (True if health is None else await health())

    @app.get("/health")
    async def healthy() -> Response:
        """Liveness from what the ingress knows (never a call that could queue): 503 while no
        attention replica serves."""
        ok = await alive()
        return JSONResponse({"status": "ok" if ok else "unhealthy"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def readiness() -> Response:
        """Readiness, unlike /health (liveness): 503 'degraded' while some expert group has no live
        holder (its steps wait for a failover), so a balancer can prefer another replica."""
        alive_now = await alive()
        try:
            state = {"ready": alive_now} if ready is None else await asyncio.wait_for(ready(), 5)
        except Exception:  # noqa: BLE001 - no replica answered in time
            state, alive_now = {"ready": False}, False
        ok = alive_now and bool(state.get("ready"))
        body = {**state, "status": "ready" if ok else ("degraded" if alive_now else "unhealthy"), "ready": ok}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        text = metrics.render()
        if not backend.shares_metrics:  # the replicas' engine families: tokens, latencies, gauges
            try:
                text += await asyncio.wait_for(backend.call("metrics_text"), 5)
            except Exception:  # noqa: BLE001 - the ingress's own families still answer
                log.warning("no replica answered /metrics in time; serving the ingress's families only")
        return Response(text, media_type=CONTENT_TYPE)

    install_request_schemas(app)
    # Outermost last: counting sees the 401s that auth answers itself and every 500 (ErrorBoundary);
    # the guard runs after auth, so an unauthenticated client's body is never read.
    app.add_middleware(RequestGuard, limits=limits or GuardLimits(max_body_bytes=settings.max_body_bytes),
                       max_n=settings.max_n, metrics=metrics, takes_body=post_route_matcher(app.router))
    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(settings.api_keys), own_keys=own_keys)
    app.add_middleware(ErrorBoundary, metrics=metrics)
    app.add_middleware(RouteMetricsMiddleware, metrics=metrics)
    return app


__all__ = ["APIError", "ClosingStreamingResponse", "Front", "KNOWN_ROUTES", "build_http_app"]
