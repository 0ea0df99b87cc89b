"""Tests for the web app and REST API (cnnkit.web): endpoints, limits, bad input, batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException

from cnnkit.config import Preprocessing
from cnnkit.data.digits import DigitsSource
from cnnkit.inference.artifact import ModelMetadata, load_model, save_model
from cnnkit.inference.predictor import Predictor
from cnnkit.models.registry import create_model
from cnnkit.web import prediction
from cnnkit.web.app import MAX_CONCURRENT_REQUESTS, create_app
from cnnkit.web.batching import MicroBatcher
from cnnkit.web.drawing import (
    canvas_to_digit,
    canvas_to_symbol,
    estimate_stroke_width,
    ink_mask,
)
from cnnkit.web.limits import BodySizeLimitMiddleware, InFlightLimitMiddleware
from cnnkit.web.render import MAX_LATEX_LENGTH, render_latex_svg
from cnnkit.web.schema import ErrorAnswer, PredictAnswer
from cnnkit.web.server import (
    is_loopback,
    load_predictor,
    normalize_host,
    optimize_for_serving,
    page_url,
    serve,
)
from cnnkit.web.upload import ImageRequest, _header_options, parse_multipart

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SYMBOL_CLASSES = (r"\alpha", r"\beta", r"\sum", "A", r"\male", r"\mathds{R}", "7")
XML_NAMESPACE = re.compile(r'xmlns(:\w+)?="[^"]*"')
BIRD_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
# The live server's body timeout: long enough to fill its in-flight places with stalled uploads
# first, short enough to keep the tests quick.
LIVE_BODY_TIMEOUT_SECONDS = 2.0
LIVE_BODY_DEADLINE_SECONDS = 4.0


@pytest.fixture(scope="module")
def symbol_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("symbol_cnn", len(SYMBOL_CLASSES), in_channels=1, width=8)
    metadata = ModelMetadata(
        "symbol_cnn", SYMBOL_CLASSES, model.default_preprocessing, options={"width": 8}
    )
    return save_model(tmp_path_factory.mktemp("models") / "symbols.safetensors", model, metadata)


@pytest.fixture(scope="module")
def photo_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = create_model("symbol_cnn", len(BIRD_CLASSES), in_channels=3, width=8)
    preprocessing = Preprocessing("photo", 3, 64, 72, (0.5,) * 3, (0.5,) * 3)
    metadata = ModelMetadata("symbol_cnn", BIRD_CLASSES, preprocessing, options={"width": 8})
    return save_model(tmp_path_factory.mktemp("models") / "photos.safetensors", model, metadata)


@pytest.fixture(scope="module")
def predictor(symbol_model_path: Path) -> Predictor:
    return Predictor.from_file(symbol_model_path)


@pytest.fixture(scope="module")
def client(predictor: Predictor):
    with TestClient(create_app(predictor, max_upload_bytes=200_000)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def live_url(predictor: Predictor) -> Iterator[str]:
    """The app served by uvicorn on a real loopback socket, for what TestClient cannot show
    (stalled bodies, connection resets)."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    app = create_app(
        predictor,
        max_upload_bytes=200_000,
        body_timeout_seconds=LIVE_BODY_TIMEOUT_SECONDS,
        body_deadline_seconds=LIVE_BODY_DEADLINE_SECONDS,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the live test server did not start"
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A socket to the live server that has sent ``head`` (request line and headers) and
    ``body``, and no more."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    return connection


def read_answer(connection: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer on ``connection``, which is then closed."""
    with connection, connection.makefile("rb") as stream:
        status = int(stream.readline().split()[1])
        headers = dict(
            line.decode().lower().split(":", 1) for line in iter(stream.readline, b"\r\n")
        )
        return status, json.loads(stream.read(int(headers["content-length"])))


async def call_asgi(application, method: str = "GET", path: str = "/") -> tuple[int, dict, bytes]:
    """Call an ASGI app with an empty request; its status, headers and body."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    await application(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def symbol_image(seed: int) -> Image.Image:
    generator = np.random.default_rng(seed)
    image = Image.new("L", (32, 32), 255)
    points = [tuple(int(v) for v in generator.integers(0, 32, 2)) for _ in range(4)]
    ImageDraw.Draw(image).line(points, fill=0, width=2)
    return image


def canvas_drawing(size: int = 300, line_width: int = 12) -> Image.Image:
    """A transparent canvas with an alpha-like curve, as a browser canvas would export."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    curve = [(60 + 180 * t, 150 + 70 * np.sin(6 * t)) for t in np.linspace(0, 1, 50)]
    draw.line(curve, fill=(0, 0, 0, 255), width=line_width, joint="curve")
    draw.ellipse((110, 90, 190, 210), outline=(0, 0, 0, 255), width=line_width)
    return image


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def post_file(client: TestClient, data: bytes, **fields: str):
    return client.post(
        "/api/predict", files={"file": ("image.png", data, "image/png")}, data=fields
    )


def as_pairs(predictions: list[dict]) -> list[tuple[str, float]]:
    return [(entry["label"], round(entry["confidence"], 5)) for entry in predictions]


# ----- Page, static assets, model description, health -----


def test_index_page_is_self_contained(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css", "/static/favicon.svg"):
        assert asset in response.text
        served = client.get(asset)
        assert served.status_code == 200
        # No CDN or other remote asset: every URL the page uses is on this server.
        assert not re.search("https?://", XML_NAMESPACE.sub("", served.text)), asset
    assert not re.search("https?://", response.text)


@pytest.mark.parametrize("path", ["/static/app.py", "/static/..%2Fapp.py", "/static/%2e%2e/app.py"])
def test_static_serves_only_known_assets(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_health(client: TestClient) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["model"]["kind"] == "symbols"


def test_model_description(client: TestClient) -> None:
    body = client.get("/api/model").json()
    assert body["class_names"] == list(SYMBOL_CLASSES)
    assert body["num_classes"] == len(SYMBOL_CLASSES)
    assert body["kind"] == "symbols"
    assert body["architecture"] == "symbol_cnn"
    assert body["input_shape"] == [1, 32, 32]
    assert body["preprocessing"]["image_size"] == 32
    assert body["max_upload_bytes"] == 200_000


@pytest.mark.parametrize("path", ["/", "/healthz", "/static/app.js", "/api/model", "/docs"])
def test_head_requests_are_answered(client: TestClient, path: str) -> None:
    response = client.head(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == client.get(path).headers["content-type"]


def test_the_model_description_names_the_training_data_without_its_folder(
    tmp_path: Path,
) -> None:
    model = create_model("symbol_cnn", len(SYMBOL_CLASSES), in_channels=1, width=8)
    training = {"dataset": "hasy", "data": "/home/someone/private/HASYv2.tar.bz2", "fold": 1}
    metadata = ModelMetadata(
        "symbol_cnn", SYMBOL_CLASSES, model.default_preprocessing, {"width": 8}, training
    )
    path = save_model(tmp_path / "trained.safetensors", model, metadata)
    predictor = Predictor.from_file(path)
    with TestClient(create_app(predictor)) as test_client:
        response = test_client.get("/api/model")
    assert response.json()["training"] == {**training, "data": "HASYv2.tar.bz2"}
    assert "someone" not in response.text
    assert predictor.metadata.training["data"] == training["data"]  # The Python API keeps it.


def test_openapi_docs_list_the_endpoints(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/predict", "/api/model", "/api/render", "/healthz"} <= set(paths)


def test_openapi_describes_the_predict_requests_and_answers(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/api/predict"]["post"]
    bodies = operation["requestBody"]["content"]
    assert set(bodies) == {"multipart/form-data", "application/json", "image/*"}
    assert bodies["multipart/form-data"]["schema"]["required"] == ["file"]
    assert bodies["application/json"]["schema"]["required"] == ["image"]
    schemas = document["components"]["schemas"]
    assert set(schemas["PredictAnswer"]["properties"]) == {"predictions", "model"}
    assert set(schemas["ErrorAnswer"]["properties"]) == {"error"}
    assert {"200", "400", "413", "415"} <= set(operation["responses"])
    query = {
        parameter["name"] for parameter in operation["parameters"] if parameter["in"] == "query"
    }
    assert query == {"source", "top_k"}
    # The documented shapes are the ones the API sends.
    image = png_bytes(Image.new("L", (32, 32), 255))
    answer = client.post("/api/predict", files={"file": ("a.png", image, "image/png")}).json()
    PredictAnswer.model_validate(answer)
    error = client.post("/api/predict", content=b"x", headers={"content-type": "text/plain"})
    assert error.status_code == 415
    ErrorAnswer.model_validate(error.json())


def test_openapi_describes_the_render_answers_as_sent(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    responses = document["paths"]["/api/render"]["get"]["responses"]
    assert set(responses["200"]["content"]) == {"image/svg+xml"}
    schema = responses["422"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErrorAnswer"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
    blank = client.get("/api/render", params={"latex": " "})
    assert blank.status_code == 422
    ErrorAnswer.model_validate(blank.json())
    assert (
        client.get("/api/render", params={"latex": r"\alpha"})
        .headers["content-type"]
        .startswith("image/svg+xml")
    )


def test_the_head_routes_stay_out_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/healthz"]) == {"get"}


def test_the_docs_page_loads_nothing_from_other_sites(client: TestClient) -> None:
    page = client.get("/docs").text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(source.startswith("/") for source in sources), sources
    for source in sources:
        response = client.get(source)
        assert response.status_code == 200 and len(response.content) > 100, source
    assert client.get("/docs/assets/index.html").status_code == 404  # Only the two files.
    # The Swagger UI served must read the OpenAPI version the app writes (Swagger UI 4 only
    # accepted 3.0.x and showed "Unable to render this definition" for FastAPI's 3.1.0).
    major_minor = client.get("/openapi.json").json()["openapi"].rsplit(".", 1)[0]
    script = next(s for s in sources if s.endswith(".js"))
    assert "^" + major_minor.replace(".", "\\.") + "\\." in client.get(script).text


@pytest.mark.parametrize("method, path", [("GET", "/nowhere"), ("GET", "/api/predict")])
def test_unknown_routes_give_json_errors(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code in (404, 405)
    assert "error" in response.json()


# ----- Predictions -----


def test_multipart_prediction_matches_the_predictor(
    client: TestClient, predictor: Predictor
) -> None:
    image = symbol_image(0)
    response = post_file(client, png_bytes(image))
    assert response.status_code == 200
    body = response.json()
    expected = [p.to_dict() for p in predictor.predict([image], top_k=5)[0]]
    assert as_pairs(body["predictions"]) == as_pairs(expected)
    assert body["model"] == {
        "architecture": "symbol_cnn",
        "kind": "symbols",
        "num_classes": len(SYMBOL_CLASSES),
        "input_shape": [1, 32, 32],
        "runtime": "pytorch",
    }
    assert all(entry["render"].startswith("/api/render?latex=") for entry in body["predictions"])


def test_a_label_that_cannot_render_gets_no_render_link(tmp_path: Path) -> None:
    """/api/render refuses LaTeX over MAX_LATEX_LENGTH or made only of whitespace, so no
    prediction links there."""
    long_label = "\\" + "x" * MAX_LATEX_LENGTH
    labels = ("A", long_label, " \t")
    model = create_model("symbol_cnn", len(labels), in_channels=1, width=8)
    metadata = ModelMetadata("symbol_cnn", labels, model.default_preprocessing, {"width": 8})
    path = save_model(tmp_path / "long.safetensors", model, metadata)
    with TestClient(create_app(Predictor.from_file(path))) as test_client:
        response = post_file(test_client, png_bytes(symbol_image(0)))
    assert response.status_code == 200
    links = {entry["label"]: entry.get("render") for entry in response.json()["predictions"]}
    assert links == {"A": "/api/render?latex=A", long_label: None, " \t": None}


@pytest.mark.parametrize("data_url", ["", "data:image/png;base64,", "DATA:image/png;BASE64,"])
def test_json_base64_prediction(client: TestClient, data_url: str) -> None:
    data = png_bytes(symbol_image(1))
    encoded = data_url + base64.b64encode(data).decode()  # A URL's scheme ignores case.
    response = client.post("/api/predict", json={"image": encoded, "top_k": 3})
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3
    assert as_pairs(response.json()["predictions"]) == as_pairs(
        post_file(client, data, top_k="3").json()["predictions"]
    )


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_line_wrapped_base64_is_read(client: TestClient, line_end: str) -> None:
    """GNU base64 and MIME wrap at 76 columns; the line breaks are not part of the data."""
    data = png_bytes(symbol_image(1))
    wrapped = base64.encodebytes(data).decode().replace("\n", line_end)
    assert wrapped.count(line_end) > 1
    expected = as_pairs(post_file(client, data).json()["predictions"])
    for image in (wrapped, "data:image/png;base64," + wrapped, " \t" + wrapped):
        response = client.post("/api/predict", json={"image": image})
        assert response.status_code == 200, response.text
        assert as_pairs(response.json()["predictions"]) == expected


@pytest.mark.parametrize("image", ["aG k=$", "aGk=\u00a0", "aGk=\u2028"])
def test_base64_with_other_characters_is_refused(client: TestClient, image: str) -> None:
    response = client.post("/api/predict", json={"image": image})
    assert response.status_code == 400
    assert response.json()["error"] == "'image' is not valid base64"


def test_raw_image_body_prediction(client: TestClient, predictor: Predictor) -> None:
    image = symbol_image(2)
    response = client.post(
        "/api/predict?top_k=2", content=png_bytes(image), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200
    # A 32x32 upload is used as it is: the same two classes and confidences as the predictor.
    expected = [p.to_dict() for p in predictor.predict([image], top_k=2)[0]]
    assert as_pairs(response.json()["predictions"]) == as_pairs(expected)


@pytest.mark.parametrize("form", ["multipart", "json", "raw"])
def test_query_parameters_apply_to_every_form_and_a_body_field_wins(
    client: TestClient, predictor: Predictor, form: str
) -> None:
    data = png_bytes(symbol_image(4))

    def send(query: str, **fields: str) -> httpx.Response:
        url = "/api/predict?" + query
        if form == "multipart":
            return client.post(url, files={"file": ("image.png", data, "image/png")}, data=fields)
        if form == "json":
            return client.post(url, json={"image": base64.b64encode(data).decode(), **fields})
        return client.post(url, content=data, headers={"content-type": "image/png"})

    assert len(send("top_k=2").json()["predictions"]) == 2
    # A 32x32 upload is used as it is; from the canvas it is cropped to its ink first.
    drawn = [p.to_dict() for p in predictor.predict([canvas_to_symbol(symbol_image(4))])[0]]
    assert as_pairs(send("source=canvas").json()["predictions"]) == as_pairs(drawn)
    response = send("top_k=0")
    assert response.status_code == 400 and "top_k" in response.json()["error"]
    if form != "raw":
        assert len(send("top_k=2", top_k="3").json()["predictions"]) == 3
        assert send("source=nowhere", source="upload").status_code == 200


def test_canvas_source_turns_the_drawing_into_a_training_symbol(
    client: TestClient, predictor: Predictor
) -> None:
    drawing = canvas_drawing()
    response = post_file(client, png_bytes(drawing), source="canvas")
    assert response.status_code == 200
    expected = [p.to_dict() for p in predictor.predict([canvas_to_symbol(drawing)])[0]]
    assert as_pairs(response.json()["predictions"]) == as_pairs(expected)


def plus_sign(size: int = 400, arm: int = 50) -> Image.Image:
    """A white ``size`` x ``size`` image with a black "+" ``2 * arm`` px across in its middle."""
    image = Image.new("L", (size, size), 255)
    draw, middle = ImageDraw.Draw(image), size // 2
    draw.line([(middle - arm, middle), (middle + arm, middle)], fill=0, width=8)
    draw.line([(middle, middle - arm), (middle, middle + arm)], fill=0, width=8)
    return image


@pytest.mark.parametrize("form", ["multipart", "json", "raw"])
def test_an_upload_larger_than_the_stored_size_is_cropped_to_its_ink(
    client: TestClient, predictor: Predictor, form: str
) -> None:
    """A symbol on a large page reads as the same drawing sent from the canvas."""
    data = png_bytes(plus_sign())
    if form == "multipart":
        response = post_file(client, data)
    elif form == "json":
        response = client.post("/api/predict", json={"image": base64.b64encode(data).decode()})
    else:
        response = client.post("/api/predict", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200
    expected = [p.to_dict() for p in predictor.predict([canvas_to_symbol(plus_sign())])[0]]
    assert as_pairs(response.json()["predictions"]) == as_pairs(expected)
    assert as_pairs(response.json()["predictions"]) == as_pairs(
        post_file(client, data, source="canvas").json()["predictions"]
    )


def test_an_upload_stored_sideways_is_turned_upright_before_it_is_cropped(
    client: TestClient,
) -> None:
    """A phone photo of a drawing is stored sideways with an EXIF orientation: the server
    reads it as the page's preview shows it, upright."""
    white = Image.new("RGBA", (300, 300), "white")
    drawing = Image.alpha_composite(white, canvas_drawing()).convert("L")  # Black on white.
    upright_answer = post_file(client, png_bytes(drawing)).json()["predictions"]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view.
    buffer = io.BytesIO()
    drawing.transpose(Image.Transpose.ROTATE_90).save(buffer, "PNG", exif=exif.tobytes())
    sideways_answer = post_file(client, buffer.getvalue()).json()["predictions"]
    assert as_pairs(sideways_answer) == as_pairs(upright_answer)
    unturned = post_file(client, png_bytes(drawing.transpose(Image.Transpose.ROTATE_90)))
    assert as_pairs(unturned.json()["predictions"]) != as_pairs(upright_answer)


def test_an_upload_at_the_stored_size_is_used_as_it_is(
    client: TestClient, predictor: Predictor
) -> None:
    """A HASYv2-sized symbol with a margin is not blown up to fill the frame."""
    small = plus_sign(32, 6)
    response = post_file(client, png_bytes(small))
    expected = [p.to_dict() for p in predictor.predict([small])[0]]
    assert as_pairs(response.json()["predictions"]) == as_pairs(expected)
    assert canvas_to_symbol(small).tobytes() != small.tobytes()  # Cropping would change it.


@pytest.mark.parametrize("side", [16, 31])
def test_an_upload_smaller_than_the_stored_size_is_cropped_too(
    client: TestClient, predictor: Predictor, side: int
) -> None:
    """Only an image of exactly the stored size can be in the training form: a smaller one
    would be scaled up with its margin, so the same drawing would answer differently."""
    small = plus_sign(side, side // 5)
    response = post_file(client, png_bytes(small))
    expected = [p.to_dict() for p in predictor.predict([canvas_to_symbol(small)])[0]]
    assert as_pairs(response.json()["predictions"]) == as_pairs(expected)


def test_a_lab_drawing_is_read_like_an_upload(client: TestClient, predictor: Predictor) -> None:
    ink = canvas_drawing().getchannel("A").point(lambda alpha: 255 - alpha)
    neutral = Image.new("L", ink.size, 128)
    lab = Image.merge("LAB", (ink, neutral, neutral))
    buffer = io.BytesIO()
    lab.save(buffer, "TIFF", compression="tiff_deflate")
    response = post_file(client, buffer.getvalue(), source="canvas")
    assert response.status_code == 200, response.text
    expected = [p.to_dict() for p in predictor.predict([canvas_to_symbol(ink)])[0]]
    assert as_pairs(response.json()["predictions"]) == as_pairs(expected)


def test_a_digits_model_gets_drawings_in_the_digits_form(
    symbol_model_path: Path, tmp_path: Path
) -> None:
    """8x8 counts of ink, upscaled as the training scans were; not HASYv2's 2 px strokes."""
    source = load_model(symbol_model_path)
    training = {"dataset": "digits"}
    path = save_model(
        tmp_path / "digits.safetensors", source, replace(source.metadata, training=training)
    )
    digits_predictor = Predictor.from_file(path)
    drawing = canvas_drawing()
    digit = canvas_to_digit(drawing)
    assert digit.size == (8, 8) and digit.mode == "L"
    # Both forms' top classes differ for this drawing, so the test tells them apart.
    as_digit = [p.to_dict() for p in digits_predictor.predict([digit])[0]]
    as_symbol = [p.to_dict() for p in digits_predictor.predict([canvas_to_symbol(drawing)])[0]]
    assert as_pairs(as_digit) != as_pairs(as_symbol)
    # One of the digits' own 8x8 scans is in that form already: an upload of it is used as
    # it is, as `cnnkit predict` uses it (re-drawn, its predictions would change).
    scan = DigitsSource().image(3)
    as_scan = [p.to_dict() for p in digits_predictor.predict([scan])[0]]
    redrawn = [p.to_dict() for p in digits_predictor.predict([canvas_to_digit(scan)])[0]]
    assert as_pairs(as_scan) != as_pairs(redrawn)
    with TestClient(create_app(digits_predictor)) as digits_client:
        response = post_file(digits_client, png_bytes(drawing), source="canvas")
        uploaded = post_file(digits_client, png_bytes(scan))
    assert response.status_code == 200, response.text
    assert as_pairs(response.json()["predictions"]) == as_pairs(as_digit)
    assert uploaded.status_code == 200, uploaded.text
    assert as_pairs(uploaded.json()["predictions"]) == as_pairs(as_scan)


def test_class_names_from_file_names_that_are_not_utf8_are_served(
    symbol_model_path: Path, tmp_path: Path
) -> None:
    """A folder dataset's class named by bytes that are not UTF-8 holds a surrogate, which no
    JSON encoder writes: it is served as U+FFFD, as `cnnkit predict` prints it."""
    source = load_model(symbol_model_path)
    odd = os.fsdecode(b"cr\xffoss")
    names = (odd, *source.metadata.class_names[1:])
    training = {"dataset": "folder", "data": os.fsdecode(b"/data/b\xfcrds")}
    path = save_model(
        tmp_path / "odd.safetensors",
        source,
        replace(source.metadata, class_names=names, training=training),
    )
    with TestClient(create_app(Predictor.from_file(path))) as odd_client:
        described = odd_client.get("/api/model")
        answers = [
            post_file(odd_client, png_bytes(symbol_image(seed)), top_k=str(len(names)))
            for seed in range(2)
        ]
    assert described.status_code == 200, described.text
    assert described.json()["class_names"][0] == "cr\ufffdoss"
    assert described.json()["training"]["data"] == "b\ufffdrds"  # By name only, as always.
    for answer in answers:
        assert answer.status_code == 200, answer.text
        labels = [entry["label"] for entry in answer.json()["predictions"]]
        assert "cr\ufffdoss" in labels
        entry = next(e for e in answer.json()["predictions"] if e["label"] == "cr\ufffdoss")
        assert entry["index"] == 0
        assert entry["render"] == "/api/render?latex=cr%EF%BF%BDoss"


def test_image_errors_on_the_canvas_path_get_a_400(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unconvertible(image: Image.Image) -> Image.Image:
        raise ValueError("conversion from XYZ to L not supported")

    monkeypatch.setattr(prediction, "canvas_to_symbol", unconvertible)
    response = post_file(client, png_bytes(canvas_drawing()), source="canvas")
    assert response.status_code == 400
    assert "conversion from XYZ to L not supported" in response.json()["error"]


def test_images_large_in_pixels_are_decoded_outside_the_batch_thread(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2000x2000 one-bit PNG is a few kB; decoding it must not hold up the batch."""
    decoded_in: dict[tuple[int, int], str] = {}
    prepare = prediction.PredictionService.prepare

    def recording_prepare(service, image_request):
        size = Image.open(io.BytesIO(image_request.data)).size
        decoded_in[size] = threading.current_thread().name
        return prepare(service, image_request)

    monkeypatch.setattr(prediction.PredictionService, "prepare", recording_prepare)
    large = png_bytes(Image.new("1", (2000, 2000), 1))
    assert len(large) < 64 * 1024
    with TestClient(create_app(predictor)) as test_client:
        for data in (large, png_bytes(symbol_image(0)), png_bytes(plus_sign())):
            assert post_file(test_client, data).status_code == 200
    assert not decoded_in[(2000, 2000)].startswith("cnnkit-batch")
    assert decoded_in[(32, 32)].startswith("cnnkit-batch")  # Small ones save the thread hop.
    # Few pixels, but cropped to its ink (canvas_to_symbol's work): not in the batch thread.
    assert not decoded_in[(400, 400)].startswith("cnnkit-batch")


def test_large_images_are_prepared_a_few_at_a_time(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each can take hundreds of MB while decoded: eight at once must not all be in memory."""
    lock, running, most = threading.Lock(), [0], [0]
    prepare = prediction.PredictionService.prepare

    def counting_prepare(service, image_request):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # Long enough for the others to start, were they let through.
        try:
            return prepare(service, image_request)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(prediction.PredictionService, "prepare", counting_prepare)

    service = prediction.PredictionService(predictor)  # As create_app makes it: outside a loop.
    drawing = png_bytes(canvas_drawing())

    async def predict_all(cancelled: int) -> list:
        try:
            requests = [ImageRequest(drawing, source="canvas") for _ in range(8)]
            tasks = [asyncio.ensure_future(service.predict(r)) for r in requests]
            await asyncio.sleep(0.02)  # The first two are being prepared: cancelled there.
            for task in tasks[:cancelled]:
                task.cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await service.close()

    results = asyncio.run(predict_all(0))
    assert len(results) == 8 and len({r[0].label for r in results}) == 1
    assert most[0] == prediction.HEAVY_PREPARES
    # Again in another loop (a second server run), with two requests cancelled mid-prepare:
    # their threads keep their places until they are done.
    results = asyncio.run(predict_all(2))
    assert [type(r).__name__ for r in results[:2]] == ["CancelledError"] * 2
    assert len({r[0].label for r in results[2:]}) == 1
    assert most[0] == prediction.HEAVY_PREPARES


def test_top_k_is_clamped_and_validated(client: TestClient) -> None:
    data = png_bytes(symbol_image(3))
    assert len(post_file(client, data, top_k="100").json()["predictions"]) == len(SYMBOL_CLASSES)
    for bad in ("0", "-2", "three"):
        response = post_file(client, data, top_k=bad)
        assert response.status_code == 400
        assert "top_k" in response.json()["error"]


def test_photo_model_prediction(photo_model_path: Path) -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    predictor = Predictor.from_file(photo_model_path)
    with TestClient(create_app(predictor)) as photo_client:
        assert photo_client.get("/api/model").json()["kind"] == "photos"
        response = post_file(photo_client, buffer.getvalue())
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [entry["label"] for entry in predictions] == [
        p.label for p in predictor.predict([Image.open(buffer)], top_k=5)[0]
    ]
    assert "render" not in predictions[0]
    assert sum(entry["confidence"] for entry in predictions) == pytest.approx(1.0, abs=1e-5)


def test_concurrent_requests_match_sequential_ones(client: TestClient) -> None:
    images = [png_bytes(symbol_image(seed)) for seed in range(32)]
    sequential = [as_pairs(post_file(client, data).json()["predictions"]) for data in images]
    before = client.get("/healthz").json()
    concurrent: list = [None] * len(images)

    def worker(index: int) -> None:
        response = post_file(client, images[index])
        concurrent[index] = (response.status_code, as_pairs(response.json()["predictions"]))

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in concurrent] == [200] * len(images)
    assert [pairs for _, pairs in concurrent] == sequential
    after = client.get("/healthz").json()
    assert after["predictions_run"] - before["predictions_run"] == len(images)


# ----- Limits and bad input -----


def test_declared_size_over_the_limit_is_refused(client: TestClient) -> None:
    response = post_file(client, b"\x00" * 300_000)
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


def test_chunked_body_over_the_limit_is_refused(client: TestClient) -> None:
    def chunks():
        for _ in range(50):
            yield b"\x00" * 10_000

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


def test_a_lying_content_length_does_not_bypass_the_limit() -> None:
    """Drive the middleware directly: the header says 10 bytes, the body brings 50 kB."""
    seen: list[int] = []

    async def application(scope, receive, send) -> None:
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                return

    messages = [{"type": "http.request", "body": b"x" * 10_000, "more_body": True}] * 5
    messages = [*messages, {"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        return messages.pop(0)

    async def send(message) -> None:
        raise AssertionError("the middleware itself must not answer here")

    middleware = BodySizeLimitMiddleware(application, max_upload_bytes=20_000)
    scope = {
        "type": "http",
        "headers": [(b"content-length", b"10"), (b"content-type", b"image/png")],
    }
    with pytest.raises(Exception) as raised:
        asyncio.run(middleware(scope, receive, send))
    assert getattr(raised.value, "status_code", None) == 413
    assert sum(seen) <= 20_000


def test_requests_over_the_in_flight_limit_get_503_and_the_count_recovers() -> None:
    """Two requests hold the limit of 2; a third is turned away at once; later ones pass."""
    release = asyncio.Event()
    started = 0

    async def application(scope, receive, send) -> None:
        nonlocal started
        started += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = InFlightLimitMiddleware(application, limit=2)

    async def scenario():
        held = [asyncio.create_task(call_asgi(middleware)) for _ in range(2)]
        while started < 2:
            await asyncio.sleep(0)
        refused = await call_asgi(middleware)
        release.set()
        return refused, await asyncio.gather(*held), await call_asgi(middleware)

    refused, held, later = asyncio.run(scenario())
    assert refused[0] == 503 and refused[1][b"retry-after"] == b"1"
    assert json.loads(refused[2]) == {"error": "the server is busy; retry shortly"}
    assert [status for status, _, _ in held] == [200, 200] and later[0] == 200
    assert middleware.in_flight == 0
    with pytest.raises(ValueError, match="limit must be >= 1"):
        InFlightLimitMiddleware(application, limit=0)


def test_health_checks_pass_the_in_flight_limit() -> None:
    release = asyncio.Event()

    async def application(scope, receive, send) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = InFlightLimitMiddleware(application, limit=1, exempt_paths=["/healthz"])

    async def scenario():
        held = asyncio.create_task(call_asgi(middleware, "POST", "/slow"))
        while middleware.in_flight < 1:
            await asyncio.sleep(0)
        answers = [
            await call_asgi(middleware, method, path)
            for method, path in [("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/")]
        ]
        release.set()
        await held
        return answers

    statuses = [status for status, _, _ in asyncio.run(scenario())]
    assert statuses == [200, 200, 503]
    assert middleware.in_flight == 0


def test_a_burst_of_renders_holds_few_threads_and_health_answers(
    predictor: Predictor, monkeypatch
) -> None:
    """Renders run one at a time: those waiting are bounded (503 beyond), and the page,
    health checks and the model's description never wait for a thread behind them."""
    import anyio.to_thread
    import httpx

    release, started = threading.Event(), threading.Semaphore(0)

    def slow_render(latex: str) -> bytes:
        started.release()
        release.wait(30)
        return b"<svg/>"

    monkeypatch.setattr("cnnkit.web.app.render_latex_svg", slow_render)
    monkeypatch.setattr("cnnkit.web.app.MAX_RENDERS", 3)
    app = create_app(predictor)

    async def scenario():
        # Renders waiting for their turn hold no thread; the one running holds one.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 3
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [
                asyncio.create_task(client.get("/api/render", params={"latex": f"x_{i}"}))
                for i in range(3)
            ]
            while app.state.serving.renders < 3 or not limiter.borrowed_tokens:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # Time for a second render to take a thread, if it could.
            assert limiter.borrowed_tokens == 1
            refused = await client.get("/api/render", params={"latex": "y"})
            # The pool full: these routes need no thread (one that did would wait for the
            # render's 30 s).
            limiter.total_tokens = 1
            others = [
                await asyncio.wait_for(client.get(path), 10)
                for path in ("/healthz", "/api/model", "/")
            ]
            release.set()
            return refused, others, await asyncio.gather(*held)

    refused, others, held = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "the server is busy; retry shortly"}
    assert [answer.status_code for answer in others] == [200, 200, 200]
    assert [answer.content for answer in held] == [b"<svg/>"] * 3
    assert app.state.serving.renders == 0


@pytest.mark.parametrize("expect", [False, True])
def test_a_request_turned_away_busy_has_its_body_read_before_the_answer_ends(expect) -> None:
    """Closing on an unread body makes the kernel reset the connection, and the client loses
    the 503 (200 uploads of 1 MB at once: 72 connection resets). A client waiting for
    "100 Continue" has sent no body, so nothing is read."""
    release = asyncio.Event()

    async def application(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = InFlightLimitMiddleware(application, limit=1)
    body = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}] * 2
    body.append({"type": "http.request", "body": b"x", "more_body": False})
    headers = [(b"content-length", b"2001")] + [(b"expect", b"100-continue")] * expect

    async def scenario():
        held = asyncio.create_task(call_asgi(middleware, "POST", "/slow"))
        while middleware.in_flight < 1:
            await asyncio.sleep(0)
        unread, sent = list(body), []

        async def receive():
            return unread.pop(0)

        async def send(message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": headers}
        await middleware(scope, receive, send)
        release.set()
        await held
        return unread, sent

    unread, sent = asyncio.run(scenario())
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"]) == {"error": "the server is busy; retry shortly"}
    assert len(unread) == (3 if expect else 0)


@pytest.mark.parametrize(("max_upload_mb", "drained_mib"), [(5, 64), (100, 100)])
def test_a_busy_answer_reads_any_body_the_upload_limit_allows(max_upload_mb, drained_mib) -> None:
    """An upload the limit allows, turned away busy, is read to its end before the connection
    closes, however high the limit (``--max-upload-mb 100``); bodies past the larger of the
    limit and 64 MiB are not read to their end."""
    mib = 1 << 20
    chunk, total, read = b"x" * mib, 100 * mib, [0]

    async def application(scope, receive, send) -> None:
        raise AssertionError("a busy server does not run the request")

    middleware = InFlightLimitMiddleware(
        application, limit=1, max_upload_bytes=max_upload_mb * 1_000_000
    )
    middleware.in_flight = 1

    async def receive():
        read[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": read[0] < total}

    async def send(message) -> None:
        pass

    headers = [(b"content-length", str(total).encode()), (b"content-type", b"image/png")]
    scope = {"type": "http", "method": "POST", "path": "/api/predict", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    assert read[0] == drained_mib * mib


def test_stalled_uploads_time_out_and_do_not_lock_out_health_checks(live_url: str) -> None:
    """More stalled uploads than the in-flight limit: /healthz still answers, and every upload
    gets a 408 after the body timeout, which frees the server for everyone."""
    started = time.monotonic()
    head = "POST /api/predict HTTP/1.1\nHost: test\nContent-Type: image/png\nContent-Length: 1000"
    # Some send part of the body before they stall.
    stalled = [
        raw_request(live_url, head, b"\x89PNG" * index)
        for index in range(MAX_CONCURRENT_REQUESTS + 2)
    ]
    try:
        assert httpx.get(live_url + "/healthz", timeout=5).status_code == 200
        assert httpx.get(live_url + "/api/model", timeout=5).status_code == 503
        answers = [read_answer(connection) for connection in stalled]
    finally:
        for connection in stalled:
            connection.close()
    assert {status for status, _ in answers} <= {408, 503}
    assert sum(status == 408 for status, _ in answers) == MAX_CONCURRENT_REQUESTS
    assert time.monotonic() - started < LIVE_BODY_TIMEOUT_SECONDS + 5
    assert httpx.get(live_url + "/api/model", timeout=5).status_code == 200


def test_a_stalled_upload_gets_a_408(live_url: str) -> None:
    connection = raw_request(
        live_url,
        "POST /api/predict HTTP/1.1\nHost: test\nContent-Type: image/png\nContent-Length: 1000",
        b"\x89PNG",
    )
    status, body = read_answer(connection)
    assert status == 408
    assert body == {
        "error": f"request timeout: no part of the request body arrived for "
        f"{LIVE_BODY_TIMEOUT_SECONDS:g} seconds"
    }


def test_an_upload_trickling_a_byte_at_a_time_gets_a_408_at_the_deadline(live_url: str) -> None:
    """Each byte comes within the stall timeout, but the whole body may not take forever."""
    started = time.monotonic()
    connection = raw_request(
        live_url,
        "POST /api/predict HTTP/1.1\nHost: test\nContent-Type: image/png\nContent-Length: 1000",
    )
    connection.settimeout(0.5)  # The wait for an answer paces the bytes: one a 0.5 s.
    answered = b""
    try:
        for _ in range(40):  # About 20 s if nothing stopped it.
            try:
                connection.sendall(b"\x89")
                answered = connection.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if answered:
                break
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    assert answered.startswith(b"HTTP/1.1 408"), answered[:80]
    assert b"the request body took longer than 4 seconds to arrive" in answered
    assert LIVE_BODY_DEADLINE_SECONDS - 0.5 < elapsed < LIVE_BODY_DEADLINE_SECONDS + 4


def test_async_clients_read_the_413_for_a_declared_size_over_the_limit(live_url: str) -> None:
    """The server reads and drops the body before answering: closing with unread bytes reset
    the connection, and an async client lost the answer (httpx.ReadError)."""

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as async_client:
            return await async_client.post(
                live_url + "/api/predict",
                content=b"\0" * 6_000_000,
                headers={"content-type": "image/png"},
            )

    response = asyncio.run(post())
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


@pytest.mark.parametrize(
    "expect, body",
    [("\nExpect: 100-continue", b""), ("", b"\0" * 16_384)],
    ids=["expecting-100-continue", "sending-part-of-the-body"],
)
def test_a_declared_size_over_the_limit_is_answered_at_once(
    live_url: str, expect: str, body: bytes
) -> None:
    """Not after waiting for a body that does not come (the server drains what does come)."""
    head = "POST /api/predict HTTP/1.1\nHost: test\nContent-Type: image/png\n"
    connection = raw_request(live_url, head + "Content-Length: 6000000" + expect, body)
    started = time.monotonic()
    status, answer = read_answer(connection)
    assert status == 413 and "too large" in answer["error"]
    assert time.monotonic() - started < 2


def test_decoded_upload_over_the_limit_is_refused(predictor: Predictor) -> None:
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80), np.uint8)))
    with TestClient(create_app(predictor, max_upload_bytes=len(data) - 1)) as small_client:
        encoded = base64.b64encode(data).decode()
        assert small_client.post("/api/predict", json={"image": encoded}).status_code == 413


def test_base64_wrapped_in_lines_is_read_up_to_the_limit(predictor: Predictor) -> None:
    """An image at the upload limit, base64 wrapped at 64 columns with line breaks written in
    JSON as "\\r\\n", is read; a byte over the limit is refused. (The image is 1.1 MB, so its
    line breaks, 90 KB, are more than the 64 KiB the limit allows for a request's fields.)"""
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), np.uint8)
    data = png_bytes(Image.fromarray(noise))
    encoded = base64.b64encode(data).decode()
    wrapped = "\r\n".join(encoded[start : start + 64] for start in range(0, len(encoded), 64))
    assert len(json.dumps(wrapped)) - len(encoded) > 64 * 1024  # "\\r\\n": 4 bytes in JSON.
    for limit, status in ((len(data), 200), (len(data) - 1, 413)):
        with TestClient(create_app(predictor, max_upload_bytes=limit)) as small_client:
            response = small_client.post("/api/predict", json={"image": wrapped})
            assert response.status_code == status, response.text


NOT_AN_IMAGE = (
    "uploaded file: not a readable image "
    "(not PNG, JPEG, GIF, BMP, WebP, TIFF, PPM/PGM, AVIF, JPEG 2000, ICO or TGA)"
)
TRUNCATED = "uploaded file: truncated ("  # then Pillow's own words, e.g. "(OSError: ...)"
TOO_LARGE = (
    "uploaded file: image too large (400,000,000 pixels); "
    "images of up to 64,000,000 pixels are accepted"
)


def half_a_noisy_png() -> bytes:
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"this is not an image at all", {"multipart": NOT_AN_IMAGE}),
        # Cut inside the pixel data of a flat image, and halfway through a noisy one.
        (png_bytes(Image.new("L", (64, 64), 128))[:60], {"multipart": TRUNCATED}),
        (half_a_noisy_png(), {"multipart": TRUNCATED}),
        # An empty base64 string is refused before it is decoded.
        (
            b"",
            {
                "multipart": "uploaded file: empty file",
                "json": "'image' must be a base64 string or a data URL",
            },
        ),
        (png_declaring(20_000, 20_000), {"multipart": TOO_LARGE}),
    ],
    ids=["not-an-image", "truncated-png", "half-a-png", "empty", "decompression-bomb"],
)
def test_bad_images_get_a_clear_400(
    client: TestClient, data: bytes, expected: dict[str, str]
) -> None:
    """Each request form names what is wrong with the image (the same words unless
    ``expected`` says otherwise for the form)."""
    responses = {
        "multipart": post_file(client, data),
        "raw": client.post("/api/predict", content=data, headers={"content-type": "image/png"}),
        "json": client.post("/api/predict", json={"image": base64.b64encode(data).decode()}),
    }
    for form, response in responses.items():
        message = expected.get(form, expected["multipart"])
        assert response.status_code == 400, (form, response.text)
        error = response.json()["error"]
        if message.endswith("("):
            assert error.startswith(message) and error.endswith(")"), (form, error)
        else:
            assert error == message, form
    assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"", "", 400, "empty request body: send an image"),
        (b"", "application/json", 400, "empty request body: send an image"),
        (b"{not json", "application/json", 400, "the request body is not valid JSON"),
        (
            b"[1, 2]",
            "application/json",
            400,
            "the JSON body must be an object with an 'image' field",
        ),
        (
            json.dumps({"image": "!!!not base64!!!"}).encode(),
            "application/json",
            400,
            "'image' is not valid base64",
        ),
        (
            json.dumps({"image": "data:image/png,abc"}).encode(),
            "application/json",
            400,
            "the data URL must be base64-encoded",
        ),
        (
            json.dumps({"image": "aGk=", "source": "camera"}).encode(),
            "application/json",
            400,
            "source must be one of upload, canvas",
        ),
        (
            b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nab',
            "multipart/form-data; boundary=x",
            400,
            "malformed or truncated multipart body",
        ),
        (
            b"hello",
            "multipart/form-data",
            400,
            "multipart request without a valid boundary",
        ),
        (
            b"hello",
            "text/plain",
            415,
            "send multipart/form-data (field 'file'), a JSON body with Content-Type: "
            "application/json, or raw image/* bytes; got Content-Type: text/plain",
        ),
    ],
    ids=[
        "empty-no-type",
        "empty-json",
        "not-json",
        "json-array",
        "bad-base64",
        "data-url-not-base64",
        "unknown-source",
        "truncated-multipart",
        "multipart-no-boundary",
        "text-plain",
    ],
)
def test_malformed_requests_get_json_errors(
    client: TestClient, body: bytes, content_type: str, status: int, message: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/api/predict", content=body, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": message}


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"image": "aGk=", "top_k": ' + b"7" * 5000 + b"}", "a number has too many digits"),
        (b'{"image": "\xff"}', ""),
    ],
    ids=["deeply-nested", "huge-number", "not-utf8"],
)
def test_json_that_python_cannot_read_gets_a_400(
    client: TestClient, body: bytes, reason: str
) -> None:
    response = client.post(
        "/api/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("the request body is not valid JSON")
    assert reason in response.json()["error"]


@pytest.mark.parametrize(
    "headers, received",
    [
        (
            {"content-type": "application/x-www-form-urlencoded"},
            "got Content-Type: application/x-www-form-urlencoded",
        ),
        ({"content-type": "text/plain; charset=utf-8"}, "got Content-Type: text/plain"),
        ({}, "got no Content-Type"),
    ],
)
def test_an_unsupported_content_type_is_named_in_the_415(
    client: TestClient, headers: dict[str, str], received: str
) -> None:
    """curl -d sends a JSON body as a form unless told otherwise: the answer says so."""
    body = json.dumps({"image": base64.b64encode(png_bytes(symbol_image(0))).decode()})
    response = client.post("/api/predict", content=body, headers=headers)
    assert response.status_code == 415
    error = response.json()["error"]
    assert "a JSON body with Content-Type: application/json" in error
    assert error.endswith(received)


def test_multipart_without_a_file_field(client: TestClient) -> None:
    response = client.post("/api/predict", data={"source": "canvas"}, files={"other": ("a", b"x")})
    assert response.status_code == 400
    assert "'file'" in response.json()["error"]


def test_unexpected_errors_give_a_generic_500(symbol_model_path: Path) -> None:
    predictor = Predictor.from_file(symbol_model_path)

    def broken(prepared: np.ndarray) -> np.ndarray:
        raise RuntimeError("secret internal detail")

    predictor.probabilities = broken
    with TestClient(create_app(predictor), raise_server_exceptions=False) as broken_client:
        response = post_file(broken_client, png_bytes(symbol_image(0)))
        assert response.status_code == 500
        assert response.json() == {"error": "internal server error"}
        assert broken_client.get("/healthz").status_code == 200


def test_create_app_validates_the_limits(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="max_upload_bytes"):
        create_app(predictor, max_upload_bytes=0)
    with pytest.raises(ValueError, match="body_timeout_seconds"):
        create_app(predictor, body_timeout_seconds=0)


# ----- Multipart parsing -----


def test_multipart_parser_reads_what_httpx_encodes(client: TestClient) -> None:
    payload = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    request = client.build_request(
        "POST",
        "/api/predict",
        files={"file": ('we"ird name.png', payload, "image/png")},
        data={"source": "canvas", "top_k": "4"},
    )
    fields = parse_multipart(request.read(), request.headers["content-type"])
    assert fields == {"source": b"canvas", "top_k": b"4", "file": payload}


def test_multipart_parser_accepts_a_quoted_boundary_and_preamble() -> None:
    body = (
        b'preamble\r\n--b o\r\nContent-Disposition: form-data; name="file"\r\n\r\nxy\r\n--b o--\r\n'
    )
    assert parse_multipart(body, 'multipart/form-data; boundary="b o"') == {"file": b"xy"}


@pytest.mark.parametrize(
    "disposition, name",
    [
        ('form-data; name="file"; filename="image.png"', "file"),
        ("form-data;name=top_k", "top_k"),
        ('form-data; NAME="source"', "source"),
        # "name=" inside another parameter's quoted value is not the field's name.
        ('form-data; filename="x;name="; name="file"', "file"),
        ('form-data; filename="a;name=\\"x\\""; name="file"', "file"),
        ('form-data; name="we\\"ird"', 'we"ird'),
        ('form-data; name="caf\u00c3\u00a9"', "caf\u00e9"),  # UTF-8 bytes, read as Latin-1.
    ],
    ids=["usual", "bare", "upper-case", "name-in-filename", "escaped-filename", "escape", "utf8"],
)
def test_multipart_field_names_match_the_general_parser(disposition: str, name: str) -> None:
    """The quick split of plain header values gives what python-multipart's parser gives."""
    head = f"--b\r\nContent-Disposition: {disposition}\r\n\r\nxy\r\n--b--\r\n"
    _, options = parse_options_header(disposition)
    assert options[b"name"].decode("utf-8") == name
    assert parse_multipart(head.encode("latin-1"), "multipart/form-data; boundary=b") == {
        name: b"xy"
    }


_HEADER_PIECES = [
    "form-data", "multipart/form-data", ";", "; ", " ", "\t", "\x0b", "\x0c", "\r", "\x85",
    "\xa0", '"', "\\", "=", 'name="file"', "name=file", 'NAME="x"', "boundary=abc",
    'boundary="b c"', 'filename="a;name=b"', "name*=utf-8''x", "\xe9", ",",
]  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_HEADER_PIECES), min_size=1, max_size=12).map("".join))
def test_the_quick_header_split_agrees_with_the_general_parser(value: str) -> None:
    """Where the quick split reads a value, it finds the field name and boundary that
    python-multipart's parser finds; any other value goes to that parser."""
    quick, general = _header_options(value), parse_options_header(value)[1]
    for key in (b"name", b"boundary"):
        assert quick.get(key) == general.get(key)


def test_long_runs_of_spaces_in_a_part_header_are_read_in_one_pass() -> None:
    # A pattern that could match the spaces in many ways took minutes for a few hundred KB.
    value = "form-data; name=file" + " " * 200_000 + '"'
    assert _header_options(value) == parse_options_header(value)[1]
    part = f"--b\r\nContent-Disposition: {value}\r\n\r\nxy\r\n--b--\r\n".encode()
    with pytest.raises(HTTPException, match="headers exceed 8,192 bytes"):
        parse_multipart(part, "multipart/form-data; boundary=b")


def test_multipart_boundary_after_other_parameters() -> None:
    body = b'--WebKit-x7\r\nContent-Disposition: form-data; name="file"\r\n\r\nxy\r\n--WebKit-x7--'
    content_type = "multipart/form-data; charset=utf-8; boundary=WebKit-x7"
    assert parse_multipart(body, content_type) == {"file": b"xy"}
    with pytest.raises(HTTPException, match="boundary"):
        parse_multipart(body, "multipart/form-data; charset=utf-8")


# ----- LaTeX rendering -----


@pytest.mark.parametrize(
    "latex", [r"\alpha", r"\sum", "A", r"\mathds{R}", r"\male", r"\sqrt{}", r"\$"]
)
def test_render_returns_svg(client: TestClient, latex: str) -> None:
    response = client.get("/api/render", params={"latex": latex})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    assert "<svg" in response.text and "<path" in response.text
    assert "max-age" in response.headers["cache-control"]


def test_render_falls_back_to_text_for_unknown_commands(client: TestClient) -> None:
    for latex in (r"\notarealcommand", r"\frac{", "}" * 10, "$", "<script>alert(1)</script>"):
        response = client.get("/api/render", params={"latex": latex})
        assert response.status_code == 200, latex
        assert "<svg" in response.text
        assert "<script" not in response.text


def test_render_limits_the_input(client: TestClient) -> None:
    assert (
        client.get("/api/render", params={"latex": "x" * (MAX_LATEX_LENGTH + 1)}).status_code == 422
    )
    response = client.get("/api/render")
    assert response.status_code == 422
    assert "latex" in response.json()["error"]


@pytest.mark.parametrize("latex", ["  ", "\t\n", " \u3000 "])
def test_render_refuses_blank_latex_without_a_server_error(
    client: TestClient, latex: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = client.get("/api/render", params={"latex": latex})
    assert response.status_code == 422
    assert "not only whitespace" in response.json()["error"]
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    with pytest.raises(ValueError):
        render_latex_svg("   ")


def test_render_is_cached() -> None:
    assert render_latex_svg(r"\beta") is render_latex_svg(r"\beta")


# ----- Drawing normalisation (HASYv2 form) -----


def ink_statistics(image: Image.Image) -> tuple[int, int, float]:
    ink = np.asarray(image) < 128
    rows, columns = np.nonzero(ink)
    height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
    return int(max(height, width)), int(min(height, width)), estimate_stroke_width(ink)


@pytest.mark.parametrize("line_width", [3, 12, 30])
def test_canvas_to_symbol_matches_the_training_data(line_width: int) -> None:
    symbol = canvas_to_symbol(canvas_drawing(line_width=line_width))
    assert symbol.size == (32, 32) and symbol.mode == "L"
    assert set(np.unique(np.asarray(symbol))) <= {0, 255}
    longer, _, stroke_width = ink_statistics(symbol)
    assert longer == 32  # HASYv2 symbols touch two opposite edges.
    assert 1.5 <= stroke_width <= 2.3  # HASYv2 strokes measure 1.8 px by the same estimate.


def test_canvas_to_symbol_keeps_the_aspect_ratio() -> None:
    canvas = Image.new("L", (400, 300), 255)
    ImageDraw.Draw(canvas).rectangle((50, 100, 250, 200), outline=0, width=8)
    longer, shorter, _ = ink_statistics(canvas_to_symbol(canvas))
    assert longer == 32
    assert abs(shorter - 16) <= 2


def test_canvas_to_symbol_blank_and_dot() -> None:
    blank = canvas_to_symbol(Image.new("RGBA", (200, 200), (0, 0, 0, 0)))
    assert np.asarray(blank).min() == 255
    canvas = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(canvas).ellipse((140, 140, 152, 152), fill=0)
    longer, shorter, _ = ink_statistics(canvas_to_symbol(canvas))
    assert longer <= 6 and shorter >= 4


def test_canvas_to_symbol_keeps_dots_side_by_side() -> None:
    """Two dots on one row: the centre line of ink so much wider than tall shrank to nothing,
    and the request failed with a numpy error."""
    canvas = Image.new("L", (416, 416), 255)
    for left in (117, 285):  # The page's dots, 14 px across, at 0.3 and 0.7 of its width.
        ImageDraw.Draw(canvas).ellipse((left, 201, left + 13, 214), fill=0)
    ink = np.argwhere(np.asarray(canvas_to_symbol(canvas)) < 128)
    assert ink[:, 1].min() <= 1 and ink[:, 1].max() >= 30  # Both dots, at the frame's sides.
    assert not (ink[:, 1] == 16).any()  # Nothing between them.
    assert ink[:, 0].min() >= 12 and ink[:, 0].max() <= 19  # Centred, dot-sized.


def test_sixteen_bit_drawings_keep_their_ink() -> None:
    """Grey ink (20000 of 65535) on a 16-bit white canvas: clipping to 8 bits lost it all."""
    drawing = canvas_drawing()
    ink = np.asarray(drawing.getchannel("A")) > 127
    deep = Image.fromarray(np.where(ink, 20_000, 65_535).astype(np.uint16))
    decoded = Image.open(io.BytesIO(png_bytes(deep)))
    assert decoded.mode.startswith("I")
    assert np.array_equal(ink_mask(decoded), ink)
    assert canvas_to_symbol(decoded) == canvas_to_symbol(drawing)


# ----- Batching, serving options, host check -----


def test_micro_batcher_runs_concurrent_items_together() -> None:
    sizes: list[int] = []

    def run_batch(items: list[int]) -> list:
        sizes.append(len(items))
        return [ValueError("odd") if item % 2 else item * 10 for item in items]

    async def scenario() -> list:
        batcher = MicroBatcher(run_batch, max_batch_size=8, max_wait_seconds=0.05)
        results = await asyncio.gather(
            *(batcher.submit(item) for item in range(6)), return_exceptions=True
        )
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert sizes == [6]
    assert results[0::2] == [0, 20, 40]
    assert all(isinstance(result, ValueError) for result in results[1::2])


def test_micro_batcher_validates_its_options() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda items: items, max_batch_size=0)


def test_optimize_for_serving_keeps_the_outputs(symbol_model_path: Path) -> None:
    reference = Predictor.from_file(symbol_model_path)
    optimized = load_predictor(str(symbol_model_path))
    images = np.stack([np.asarray(symbol_image(seed))[:, :, None] for seed in range(4)])
    assert np.allclose(reference.probabilities(images), optimized.probabilities(images), atol=1e-6)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.model.modules())
    with pytest.raises(ValueError, match="eval"):
        optimize_for_serving(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)).train())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com", ""])
def test_serve_refuses_other_interfaces_unless_allowed(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="allow_remote"):
        serve(None, host=host, port=8000)


def test_allow_remote_lifts_the_host_check(tmp_path: Path) -> None:
    # The host check passes, so serving fails later, on the missing model file.
    with pytest.raises(ValueError, match="not found"):
        serve(str(tmp_path / "missing.safetensors"), host="0.0.0.0", allow_remote=True)


def test_serve_checks_the_model_and_port_before_announcing(symbol_model_path: Path) -> None:
    announced: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(str(symbol_model_path), port=port, on_ready=announced.append)
    with pytest.raises(ValueError, match="not found"):
        serve("missing.safetensors", port=port, on_ready=announced.append)
    assert announced == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_serve_refuses_a_device_the_machine_lacks_before_announcing(
    symbol_model_path: Path, capsys
) -> None:
    announced: list[str] = []
    for model in (str(symbol_model_path), None):  # The bundled model too, not its int8 copy.
        with pytest.raises(ValueError, match="CUDA is not available"):
            serve(model, port=0, on_ready=announced.append, device="cuda")
    assert announced == []
    from cnnkit.cli import main

    assert main(["serve", "--device", "cuda", "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert "Serving on" not in captured.out
    assert "CUDA is not available" in captured.err


def test_serving_on_the_cpu_by_any_name_keeps_the_bundled_models_int8_copy() -> None:
    assert load_predictor(None, threads=1, device="auto").runtime == "onnxruntime int8"
    served = load_predictor(None, threads=1, device="cpu")
    assert served.runtime == "onnxruntime int8"


@pytest.mark.parametrize(
    "host, bare, url",
    [
        ("::1", "::1", "http://[::1]:8000/"),
        ("[::1]", "::1", "http://[::1]:8000/"),
        (" [fe80::1%eth0] ", "fe80::1%eth0", "http://[fe80::1%eth0]:8000/"),
        ("127.0.0.1", "127.0.0.1", "http://127.0.0.1:8000/"),
        ("localhost", "localhost", "http://localhost:8000/"),
    ],
)
def test_hosts_are_normalized_and_ipv6_ones_bracketed_in_urls(
    host: str, bare: str, url: str
) -> None:
    assert normalize_host(host) == bare
    assert page_url(bare, 8000) == url


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_works(), reason="needs an IPv6 loopback interface")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_serve_binds_the_ipv6_loopback_and_announces_a_valid_url(
    symbol_model_path: Path, host: str
) -> None:
    class Announced(Exception):
        pass

    def stop(url: str) -> None:
        # Raised before uvicorn starts: the address was checked free and the URL written.
        raise Announced(url)

    with pytest.raises(Announced) as announced:
        serve(str(symbol_model_path), host=host, port=0, on_ready=stop)
    url = str(announced.value)
    assert re.fullmatch(r"http://\[::1\]:\d+/", url), url
    assert httpx.URL(url).host == "::1"


def test_an_exported_onnx_file_serves_the_same_predictions(
    symbol_model_path: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from cnnkit.inference.export import export_onnx

    onnx_path = export_onnx(symbol_model_path, tmp_path / "symbols.onnx")
    body = {"image": base64.b64encode(png_bytes(Image.new("L", (40, 30), 255))).decode()}
    answers = []
    for path in (symbol_model_path, onnx_path):
        with TestClient(create_app(load_predictor(str(path)))) as test_client:
            response = test_client.post("/api/predict", json=body)
        assert response.status_code == 200
        answers.append(response.json()["predictions"])
    assert [p["label"] for p in answers[0]] == [p["label"] for p in answers[1]]
    for torch_answer, onnx_answer in zip(answers[0], answers[1], strict=True):
        assert onnx_answer["confidence"] == pytest.approx(torch_answer["confidence"], abs=1e-4)
