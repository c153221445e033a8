"""The request side of the app's OpenAPI document, and the reporting of ignored request fields.

The generation routes read their body themselves (a byte limit before parsing, strict validation),
so FastAPI cannot see their request models; `body_schema` names the model in the route's OpenAPI
entry and `install_request_schemas` adds the models' JSON schemas to the document's components.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.responses import Response

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
_REQUEST_MODELS: dict[str, type[BaseModel]] = {}
IGNORED_HEADER = "X-Ignored-Fields"


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    _REQUEST_MODELS[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install_request_schemas(app: FastAPI) -> None:
    """Make app.openapi() include the request models that body_schema named."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _REQUEST_MODELS.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for def_name, definition in schema.pop("$defs", {}).items():
                    schemas.setdefault(def_name, definition)
                schemas[name] = schema
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def parse_request(model: type[M], body: bytes | dict) -> tuple[M, list[str]]:
    """Validate a body (known fields strictly) and list the unknown fields it carried. A dict is a
    body the ingress already parsed (once, with a bounded depth: cluster/serve/ingress/json_body.py)."""
    req = model.model_validate(body) if isinstance(body, dict) else model.model_validate_json(body)
    ignored = req.ignored_fields() if hasattr(req, "ignored_fields") else []
    if ignored:
        log.info("ignored unknown request fields: %s", ", ".join(ignored)[:1000])
    return req, ignored


def ignored_header(ignored: list[str]) -> str:
    """The X-Ignored-Fields value: header values must be printable ASCII, so anything else a client
    sent is shown as '?'."""
    return "".join(c if " " <= c <= "~" else "?" for c in ", ".join(ignored))[:1024]


def report_ignored(response: Response, ignored: list[str]) -> Response:
    if ignored:
        response.headers[IGNORED_HEADER] = ignored_header(ignored)
    return response
