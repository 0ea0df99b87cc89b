"""The web app and REST API: ``create_app(predictor)`` builds it (``server.serve`` runs it).

One page (static HTML, CSS and JavaScript, no external assets) adapts to the model's kind: a
drawing canvas for symbol models, a photo upload for photo models. The API predicts, describes the
model, renders LaTeX symbols and reports health; concurrent predictions share forward passes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PureWindowsPath
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from cnnkit import __version__
from cnnkit.data.source import printable
from cnnkit.inference.predictor import Predictor
from cnnkit.web.batching import PerLoop
from cnnkit.web.docs import add_docs_routes, load_docs_assets
from cnnkit.web.limits import (
    BODY_DEADLINE_SECONDS,
    BODY_TIMEOUT_SECONDS,
    BodySizeLimitMiddleware,
    InFlightLimitMiddleware,
)
from cnnkit.web.prediction import PredictionService
from cnnkit.web.render import MAX_LATEX_LENGTH, render_latex_svg
from cnnkit.web.schema import PREDICT_ERRORS, PREDICT_REQUEST, RENDER_RESPONSES, PredictAnswer
from cnnkit.web.upload import read_image_request

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 5_000_000
MAX_CONCURRENT_REQUESTS = 128
HEALTH_PATH = "/healthz"
# Symbol renders running or waiting at once; the page asks for five (cached) per prediction.
MAX_RENDERS = 32
# The page loads nothing from other origins; FastAPI's /docs (Swagger UI from a CDN) is separate.
_PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@dataclass
class ServingState:
    """What the routes share: the prediction service, limits and the static assets, and the
    count of renders running or waiting (read and changed in the event loop only)."""

    service: PredictionService
    max_upload_bytes: int
    model_summary: dict[str, Any]
    assets: dict[str, tuple[bytes, str]]
    renders: int = 0
    # The lock renders take turns on.
    render_turn: PerLoop[asyncio.Lock] = field(default_factory=lambda: PerLoop(asyncio.Lock))


def _load_assets() -> dict[str, tuple[bytes, str]]:
    # Read once at start-up: request paths select from this dict and never reach the filesystem.
    static = resources.files("cnnkit.web") / "static"
    assets = {
        name: (static.joinpath(name).read_bytes(), kind) for name, kind in _STATIC_FILES.items()
    }
    page = (resources.files("cnnkit.web") / "templates" / "index.html").read_bytes()
    assets["index.html"] = (page, "text/html; charset=utf-8")
    return assets


def model_summary(predictor: Predictor) -> dict[str, Any]:
    metadata = predictor.metadata
    preprocessing = metadata.preprocessing
    return {
        "architecture": metadata.architecture,
        "kind": metadata.kind,
        "num_classes": metadata.num_classes,
        "input_shape": [preprocessing.channels, preprocessing.image_size, preprocessing.image_size],
        "runtime": predictor.runtime,
    }


def _state(request: Request) -> ServingState:
    return request.app.state.serving


async def index(request: Request) -> Response:
    body, kind = _state(request).assets["index.html"]
    return Response(body, media_type=kind, headers={"Content-Security-Policy": _PAGE_POLICY})


async def static_file(name: str, request: Request) -> Response:
    asset = _state(request).assets.get(name) if name in _STATIC_FILES else None
    if asset is None:
        raise HTTPException(404, "not found")
    return Response(asset[0], media_type=asset[1], headers={"Cache-Control": "no-cache"})


async def health(request: Request) -> dict[str, Any]:
    """Reports that the server is up and which model it serves."""
    state = _state(request)
    return {
        "status": "ok",
        "version": __version__,
        "model": state.model_summary,
        "batches_run": state.service.batcher.batches_run,
        "predictions_run": state.service.batcher.items_run,
    }


async def model_info(request: Request) -> dict[str, Any]:
    """The model's metadata (classes, input size, kind, architecture) and the upload limit.

    The training data's location is given by name only: a full path tells a remote visitor
    about the machine the model was trained on.
    """
    state = _state(request)
    description = state.service.predictor.metadata.to_dict()
    description["training"] = _without_data_folder(description["training"])
    description.update(state.model_summary)
    # The page checks a file's size before uploading it.
    description["max_upload_bytes"] = state.max_upload_bytes
    return _printable(description)


def _printable(value: Any) -> Any:
    """``value`` with every text in it JSON can hold: a class or folder named by a file name
    that is not UTF-8 holds surrogates, which no JSON encoder writes."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_printable(each) for each in value]
    if isinstance(value, dict):
        return {_printable(key): _printable(each) for key, each in value.items()}
    return value


def _without_data_folder(training: dict[str, Any]) -> dict[str, Any]:
    """``training`` with its ``data`` path (POSIX or Windows) cut to the last component."""
    data = training.get("data")
    if not isinstance(data, str):
        return training
    return {**training, "data": PureWindowsPath(data).name}


async def render(
    request: Request, latex: str = Query(..., min_length=1, max_length=MAX_LATEX_LENGTH)
) -> Response:
    """SVG of ``latex`` drawn by matplotlib mathtext (as plain text if mathtext cannot parse it).

    Renders run in the thread pool one at a time (matplotlib is not thread-safe), at most
    :data:`MAX_RENDERS` running or waiting: a burst of them holds one of the pool's threads.

    Raises:
        HTTPException: 422 for ``latex`` made only of whitespace, which draws nothing; 503
            (with ``Retry-After``) while :data:`MAX_RENDERS` renders run or wait.
    """
    if not latex.strip():
        raise HTTPException(
            422, "invalid request (query.latex: must contain a symbol, not only whitespace)"
        )
    state = _state(request)
    if state.renders >= MAX_RENDERS:
        raise HTTPException(503, "the server is busy; retry shortly", {"Retry-After": "1"})
    state.renders += 1
    try:
        async with state.render_turn.get():  # Those waiting wait here, holding no thread.
            svg = await run_in_threadpool(render_latex_svg, latex)
    finally:
        state.renders -= 1
    return Response(
        svg,
        media_type="image/svg+xml",
        headers={
            "Cache-Control": "public, max-age=86400",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def predict(request: Request) -> JSONResponse:
    """Rank the classes for one image.

    Send multipart/form-data (``file``, optional ``source`` and ``top_k``), a JSON object
    ``{"image": "<base64 or data URL>", "source": "upload" | "canvas", "top_k": 5}``, or raw
    ``image/*`` bytes. For a symbol model, ``source="canvas"`` crops a drawing to its ink and
    makes it look like the training symbols first; an upload (``source="upload"``, the default)
    of any other size than the model's stored input size is treated the same way, and one of
    exactly that size (a HASYv2 PNG) is used as it is. ``source`` and ``top_k`` may also be
    query parameters, with any of the three forms; where the body gives one too, the body's
    field wins.
    Returns ``{"predictions": [{"label", "index", "confidence"}, ...], "model": {...}}``.
    """
    state = _state(request)
    image_request = await read_image_request(request, state.max_upload_bytes)
    ranked = await state.service.predict(image_request)
    predictions = [prediction.to_dict() for prediction in ranked]
    for prediction in predictions:
        prediction["label"] = printable(prediction["label"])
    if state.model_summary["kind"] == "symbols":
        for prediction in predictions:
            if _renders(prediction["label"]):
                prediction["render"] = _render_url(prediction["label"])
    return JSONResponse({"predictions": predictions, "model": state.model_summary})


def _renders(label: str) -> bool:
    """Whether /api/render draws ``label``: it refuses blank or longer LaTeX, and a prediction
    gets no link that can only fail."""
    return len(label) <= MAX_LATEX_LENGTH and bool(label.strip())


@functools.lru_cache(maxsize=4096)
def _render_url(label: str) -> str:
    return "/api/render?latex=" + quote(label, safe="")


def _add_routes(app: FastAPI) -> None:
    # Routes go straight onto the app: an included router costs extra matching per request,
    # and the router tries routes in order, so the busiest one comes before the others here
    # (FastAPI's own /openapi.json route is first of all).
    app.add_api_route(
        "/api/predict",
        predict,
        methods=["POST"],
        summary="Predict the classes of one image",
        response_model=PredictAnswer,
        responses=PREDICT_ERRORS,
        openapi_extra=PREDICT_REQUEST,
    )
    # HEAD too, for monitors and `curl -I`; uvicorn sends the headers without the body.
    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(
        "/static/{name}", static_file, methods=["GET", "HEAD"], include_in_schema=False
    )
    app.add_api_route(HEALTH_PATH, health, methods=["GET"], summary="Health check")
    # A separate route: one route for both methods would give the schema two operations with
    # the same operationId.
    app.add_api_route(HEALTH_PATH, health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/api/model", model_info, methods=["GET"], summary="Describe the model")
    app.add_api_route("/api/model", model_info, methods=["HEAD"], include_in_schema=False)
    app.add_api_route(
        "/api/render",
        render,
        methods=["GET"],
        summary="Render a LaTeX symbol as SVG",
        response_class=Response,
        responses=RENDER_RESPONSES,
    )


def _install_error_handlers(app: FastAPI) -> None:
    # Every error is JSON {"error": "..."}; nothing returns a stack trace to the client.
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, error.status_code, error.headers)

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        )
        return JSONResponse({"error": f"invalid request ({problems})"}, 422)

    async def client_disconnected(request: Request, error: ClientDisconnect) -> JSONResponse:
        # A client that hangs up mid-upload is routine (slow or stalled clients), not a server
        # error: no traceback in the log, and the answer goes nowhere.
        logger.debug("client disconnected during %s %s", request.method, request.url.path)
        return JSONResponse({"error": "client disconnected"}, 400)

    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse({"error": "internal server error"}, 500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, unexpected_error)


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    body_timeout_seconds: float = BODY_TIMEOUT_SECONDS,
    body_deadline_seconds: float = BODY_DEADLINE_SECONDS,
) -> FastAPI:
    """Build the web app for one model.

    Args:
        predictor: the model to serve.
        max_upload_bytes: the largest image accepted; bigger requests get HTTP 413.
        body_timeout_seconds: how long a request body may stall before HTTP 408.
        body_deadline_seconds: how long a whole request body may take before HTTP 408.

    Returns:
        A FastAPI application (run it with uvicorn, or see :func:`serve`).

    Raises:
        ValueError: if ``max_upload_bytes`` or either body time is not positive.
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be >= 1; got {max_upload_bytes}")
    for name, seconds in (
        ("body_timeout_seconds", body_timeout_seconds),
        ("body_deadline_seconds", body_deadline_seconds),
    ):
        if not seconds > 0:  # Checked here: Starlette builds the middleware on first use.
            raise ValueError(f"{name} must be > 0; got {seconds}")
    service = PredictionService(predictor)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await service.close()

    docs_assets = load_docs_assets()
    app = FastAPI(
        title="cnnkit",
        version=__version__,
        description="Predict handwritten maths symbols or bird species with a cnnkit model.",
        lifespan=lifespan,
        # Our own /docs serves Swagger UI without a CDN; ReDoc would need one.
        docs_url=None if docs_assets else "/docs",
        redoc_url=None,
    )
    _add_routes(app)
    if docs_assets:
        add_docs_routes(app, docs_assets)
    app.state.serving = ServingState(
        service, max_upload_bytes, model_summary(predictor), _load_assets()
    )
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_upload_bytes=max_upload_bytes,
        body_timeout_seconds=body_timeout_seconds,
        body_deadline_seconds=body_deadline_seconds,
    )
    app.add_middleware(
        InFlightLimitMiddleware,
        limit=MAX_CONCURRENT_REQUESTS,
        exempt_paths=[HEALTH_PATH],
        max_upload_bytes=max_upload_bytes,
    )
    _install_error_handlers(app)
    return app
