"""The OpenAPI page at ``/docs``, with Swagger UI served by the app itself so it works offline.

FastAPI's own page loads Swagger UI from a CDN, which leaves it blank without internet. The
``swagger-ui-bundle-v2`` package ships Swagger UI 5, which reads the OpenAPI 3.1 documents
FastAPI writes (Swagger UI 4 only reads 3.0); without it the app falls back to FastAPI's page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}


def load_docs_assets() -> dict[str, bytes] | None:
    """Swagger UI's script and style sheet, or ``None`` when the package is not installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    root = Path(swagger_ui_bundle.swagger_ui_path)
    return {name: (root / name).read_bytes() for name in ASSET_TYPES}


def add_docs_routes(app: FastAPI, assets: dict[str, bytes]) -> None:
    """``GET /docs`` (the page) and ``GET /docs/assets/{name}`` (its two files, from memory)."""

    def docs_page() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    def docs_asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "not found")
        return Response(
            assets[name], media_type=ASSET_TYPES[name], headers={"Cache-Control": "max-age=86400"}
        )

    app.add_api_route("/docs", docs_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(
        "/docs/assets/{name}", docs_asset, methods=["GET", "HEAD"], include_in_schema=False
    )
