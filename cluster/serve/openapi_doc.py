"""The app's OpenAPI document, its two UIs, and the reporting of ignored request fields.

The generation routes read their body themselves (a byte limit before parsing, strict validation),
so FastAPI cannot see their request models; `body_schema` names the model in the route's OpenAPI
entry and `install_request_schemas` adds the models' JSON schemas to the document's components.

`install_docs_ui`: Swagger UI at /docs and ReDoc at /redoc from assets inside the installed package
`fastapi-offline` (MIT; it ships the swagger-ui-dist and redoc bundles), served under /docs-assets,
so the pages render in an air-gapped cluster: no CDN, no Google fonts, no validator badge.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.responses import Response

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
_REQUEST_MODELS: dict[str, type[BaseModel]] = {}
IGNORED_HEADER = "X-Ignored-Fields"
DOCS_ASSETS = "/docs-assets"
DOCS_ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def docs_assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def install_docs_ui(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc (ReDoc) with every asset served by this app."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets_dir()), name="docs-assets")

    def url(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=url(request, app.openapi_url), title=f"{app.title} - Swagger UI",
            swagger_js_url=url(request, f"{DOCS_ASSETS}/swagger-ui-bundle.js"),
            swagger_css_url=url(request, f"{DOCS_ASSETS}/swagger-ui.css"),
            swagger_favicon_url=url(request, f"{DOCS_ASSETS}/favicon.png"),
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=url(request, app.openapi_url), title=f"{app.title} - ReDoc",
            redoc_js_url=url(request, f"{DOCS_ASSETS}/redoc.standalone.js"),
            redoc_favicon_url=url(request, f"{DOCS_ASSETS}/favicon.png"), with_google_fonts=False,
        )


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
