"""The /v1/responses routes, registered on a replica's app by build_http_app like the others:
bodies read with the same byte limit and parsed strictly, unknown fields named in X-Ignored-Fields."""

from __future__ import annotations

from typing import Callable, Awaitable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from cluster.serve.middleware.scope import arrival_of
from cluster.serve.openapi_doc import body_schema, parse_request, report_ignored
from cluster.serve.responses.protocol import ResponseObject, ResponsesRequest
from cluster.serve.responses.service import ResponsesService
from cluster.serve.responses.store import ResponseStore


def install_responses(app: FastAPI, server, read_body: Callable[[Request, int], Awaitable[bytes]]) -> ResponsesService:
    """`server`: the replica's OpenAIServer (its chat path and settings)."""
    settings = server.settings
    service = ResponsesService(server, ResponseStore(settings.responses_max_stored, settings.responses_max_stored_bytes))
    limit = settings.max_body_bytes

    @app.post("/v1/responses", openapi_extra=body_schema(ResponsesRequest),
              responses={200: {"model": ResponseObject, "description": "the response, or an SSE stream of Responses events"}})
    async def create_response(request: Request) -> Response:
        req, ignored = parse_request(ResponsesRequest, await read_body(request, limit))
        return report_ignored(await service.create(req, arrival_of(request.scope)), ignored)

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject)
    async def retrieve_response(response_id: str) -> Response:
        return service.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        return service.delete(response_id)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> Response:
        return service.cancel(response_id)

    return service
