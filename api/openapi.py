"""The API's description: OpenAPI for request bodies that the routes parse themselves (to control
error reporting; their models are added to the components so /docs still shows them), and the
/docs page, served offline.

/docs is Swagger UI from the `fastapi-offline` package's copy of `swagger-ui-dist` (FastAPI's own
page loads it from a CDN: broken without internet and unpinned), under a Content-Security-Policy
that lets the page load only what this app serves and never be framed, like /ui. The page has no
inline script (its set-up is /docs/init.js, the spec's URL a data attribute), so the policy needs no
'unsafe-inline'. `SDPO_DOCS_ENABLED` (default: off in production) turns /docs and /openapi.json off.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def install_openapi(app: FastAPI, body_models: list[type[BaseModel]]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in body_models:
                body = model.model_json_schema(ref_template=_REF)
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# /docs, offline

DOCS_URL = "/docs"
DOCS_ASSETS_URL = "/docs/assets"
# swagger-ui-bundle.js, swagger-ui.css and favicon.png of swagger-ui-dist 5, shipped by the package.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"

DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "font-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API docs</title>
<link rel="icon" href="{assets}/favicon.png">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{docs}/init.js"></script>
</body>
</html>
"""

# FastAPI's own Swagger UI settings, plus no validator badge (it would call validator.swagger.io).
_DOCS_INIT = """"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]
  });
})();
"""


def install_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs from the package's assets (the app must have `docs_url=None`,
    `redoc_url=None` so FastAPI's CDN pages are not there too)."""
    assert app.openapi_url, "the docs page needs the OpenAPI schema served"

    @app.get(DOCS_URL, include_in_schema=False)
    def docs_page(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = _DOCS_PAGE.format(title=html.escape(app.title), assets=html.escape(root + DOCS_ASSETS_URL),
                                 docs=html.escape(root + DOCS_URL), openapi_url=html.escape(root + app.openapi_url))
        return HTMLResponse(page, headers=DOCS_HEADERS)

    @app.get(DOCS_URL + "/init.js", include_in_schema=False)
    def docs_init() -> Response:
        return Response(_DOCS_INIT, media_type="text/javascript",
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
