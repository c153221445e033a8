"""Errors the HTTP front returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause is an APIError with a 4xx status. Anything else that escapes a
route is a bug: it becomes a 500 with a generic body (the details go to the replica log), and the
replica keeps serving. FastAPI's own 422 validation responses and Starlette's plain-text 404/405 are
replaced here so no non-OpenAI body ever leaves the server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.engine.request_rejected import RequestRejected
from actors.weights.tokenizer import ChatTemplateError

log = logging.getLogger(__name__)


class APIError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # extra response headers (Retry-After, Allow, ...)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        headers.update(self.headers or {})
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


class InvalidRequest(APIError):
    status = 400


class AuthenticationFailed(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class AdminDisabled(APIError):
    status = 403
    type = "permission_error"
    code = "admin_disabled"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, requested: str, served: str) -> None:
        super().__init__(f"The model '{requested}' does not exist; this server serves '{served}'", param="model")


class MethodNotAllowed(APIError):
    status = 405


class BodyTooLarge(APIError):
    status = 413
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than the limit of {limit} bytes")


class ServerError(APIError):
    status = 500
    type = "server_error"


class RequestTimeout(APIError):
    """The client did not send its whole body within the body-read deadline."""

    status = 408
    code = "request_timeout"
    headers = {"Connection": "close"}


class UnsupportedMediaType(APIError):
    status = 415
    code = "unsupported_media_type"


class RetryLater(APIError):
    """An answer with Retry-After: the request is fine, the server cannot take it now."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(retry_after_s)))}


class Overloaded(RetryLater):
    """The replica's waiting queue is full: come back after Retry-After seconds."""

    status = 429
    type = "overloaded_error"
    code = "server_overloaded"


class DeadlineExceeded(APIError):
    status = 504
    type = "server_error"
    code = "request_deadline_exceeded"


def is_disconnect(exc: BaseException) -> bool:
    """A client that left: Starlette's ClientDisconnect, or Ray Serve cancelling the ASGI receive or
    the request itself (TaskCancelledError, RequestCancelledError) when the proxy saw it go."""
    from starlette.requests import ClientDisconnect

    if isinstance(exc, (ClientDisconnect, asyncio.CancelledError)):
        return True
    # by name (no Ray import here); Ray may hand the error over as RayTaskError(TaskCancelledError),
    # a class made at run time whose bases carry the name
    return any(c.__name__ in ("TaskCancelledError", "RequestCancelledError") for c in type(exc).__mro__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_validation(errors: list[dict[str, Any]]) -> InvalidRequest:
    """The first pydantic error as a 400 naming the field (`messages.0.role`)."""
    if not errors:
        return InvalidRequest("Invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"The request body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    # FastAPI prefixes the location with "body"; it tells the client nothing.
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "model_type" and not loc:
        msg = "The request body must be a JSON object"
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


def as_api_error(exc: BaseException) -> APIError:
    """Map any exception from request handling to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation(exc.errors(include_url=False))
    if isinstance(exc, RequestRejected):
        return InvalidRequest(str(exc))
    if isinstance(exc, ChatTemplateError):
        return InvalidRequest(str(exc), param="messages")
    log.exception("internal error while serving a request", exc_info=exc)
    return ServerError("The server had an error while processing the request")


def install_handlers(app: FastAPI) -> None:
    """Route every error path of the FastAPI app through the OpenAI error body."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    async def on_request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation(list(exc.errors())).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err: APIError = NotFound("Unknown route", code="unknown_url")
        elif exc.status_code == 405:
            err = MethodNotAllowed("Method not allowed on this route", code="method_not_allowed")
            err.headers = dict(exc.headers or {})  # Starlette names the allowed methods in Allow
        else:
            err = APIError(str(exc.detail))
            err.status = exc.status_code
        response = err.response()
        if exc.headers:  # e.g. Allow on a 405
            response.headers.update(exc.headers)
        return response

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(ValidationError, on_api_error)
    app.add_exception_handler(RequestRejected, on_api_error)
    app.add_exception_handler(ChatTemplateError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)


class ErrorBoundary:
    """ASGI middleware just inside the metrics middleware: an exception that escapes the app (a bug)
    becomes the OpenAI 500 body here, so the metrics middleware sees and counts the 500 (Starlette's
    catch-all handler would answer it outside every user middleware). After the response started
    nothing can be sent: the exception is logged and the connection ends. A client that left
    (is_disconnect) is no error: it is counted as a disconnect and logged in one line."""

    def __init__(self, app: Any, metrics: Any = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing escapes as a bare 500
            if is_disconnect(exc):
                log.info("client left %s before its answer was complete (%s)", scope.get("path"), type(exc).__name__)
                if self.metrics is not None:
                    self.metrics.count_disconnect("response" if started else "body")
                return
            if started:
                log.exception("error after the response started", exc_info=exc)
                return
            await as_api_error(exc).response()(scope, receive, send)
