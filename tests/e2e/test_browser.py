"""The web page in a real headless Chromium: drawing a symbol, uploading a photo, showing errors.

Runs Debian's ``/usr/bin/chromium`` through Playwright against the real server (uvicorn in a
thread on 127.0.0.1). Screenshots go to ``test-output/`` at the repository root.
"""

from __future__ import annotations

import io
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import cnnkit
from cnnkit.config import Preprocessing
from cnnkit.inference.artifact import ModelMetadata, save_model
from cnnkit.models.registry import create_model

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
SYMBOL_CLASSES = (r"\alpha", r"\beta", r"\sum", r"\int", "A", r"\mathds{R}", r"\male", "7")
BIRD_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright for Python")
uvicorn = pytest.importorskip("uvicorn", reason="needs uvicorn (the web extra)")
expect = playwright_api.expect


def save_test_model(path: Path, kind: str) -> Path:
    torch.manual_seed(0)
    if kind == "symbols":
        model = create_model("symbol_cnn", len(SYMBOL_CLASSES), in_channels=1, width=8)
        metadata = ModelMetadata(
            "symbol_cnn", SYMBOL_CLASSES, model.default_preprocessing, options={"width": 8}
        )
    else:
        model = create_model("symbol_cnn", len(BIRD_CLASSES), in_channels=3, width=8)
        preprocessing = Preprocessing("photo", 3, 64, 72, (0.5,) * 3, (0.5,) * 3)
        metadata = ModelMetadata("symbol_cnn", BIRD_CLASSES, preprocessing, options={"width": 8})
    return save_model(path, model, metadata)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_path: Path) -> tuple[str, uvicorn.Server, threading.Thread]:
    from cnnkit.web.app import create_app
    from cnnkit.web.server import load_predictor

    port = free_port()
    config = uvicorn.Config(
        create_app(load_predictor(str(model_path))),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("browser-models")
    started = {
        kind: start_server(save_test_model(folder / f"{kind}.safetensors", kind))
        for kind in ("symbols", "photos")
    }
    yield {kind: url for kind, (url, _, _) in started.items()}
    for _, server, thread in started.values():
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser, servers) -> Iterator:
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    opened.problems = []
    opened.on("pageerror", lambda error: opened.problems.append(f"page error: {error}"))
    opened.on(
        "console",
        lambda message: message.type == "error" and opened.problems.append(message.text),
    )

    def note_remote(request) -> None:
        if not request.url.startswith(tuple(servers.values())) and not request.url.startswith(
            ("blob:", "data:")
        ):
            opened.problems.append(f"remote request: {request.url}")

    opened.on("request", note_remote)
    yield opened
    context.close()


def open_canvas(page, servers) -> None:
    """Open the symbol model's page and wait for its drawing canvas."""
    page.goto(servers["symbols"])
    page.wait_for_selector("#canvas:visible")


def screenshot(page, name: str) -> None:
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / name), full_page=True)


def draw_alpha(page) -> None:
    box = page.locator("#canvas").bounding_box()
    left, top, side = box["x"], box["y"], box["width"]
    points = [
        (0.8 - 0.6 * t, 0.5 + 0.28 * math.sin(2 * math.pi * t) * (1 - t))
        for t in np.linspace(0, 1, 40)
    ]
    page.mouse.move(left + points[0][0] * side, top + points[0][1] * side)
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(left + x * side, top + y * side, steps=2)
    page.mouse.up()


def test_drawing_a_symbol_shows_predictions_with_rendered_symbols(page, servers) -> None:
    open_canvas(page, servers)
    assert page.locator("#photos-panel").is_hidden()
    draw_alpha(page)
    expect(page.locator("#results .result")).to_have_count(5)
    # A string predicate would need eval, which the page's Content-Security-Policy forbids.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img.symbol')]"
        ".every(image => image.complete && image.naturalWidth > 0)"
    )
    labels = page.locator("#results code.latex").all_inner_texts()
    assert len(labels) == 5 and set(labels) <= set(SYMBOL_CLASSES)
    assert page.locator("#status").inner_text().startswith("Best guess:")
    assert page.locator("#results button.copy").count() == 5
    assert page.locator("#error").is_hidden()
    screenshot(page, "browser-symbols.png")

    page.keyboard.press("Tab")
    page.click("#undo")
    expect(page.locator("#results .result")).to_have_count(0)
    assert page.locator("#undo").is_disabled()
    assert page.problems == []


def test_uploading_a_photo_shows_species_with_confidence_bars(page, servers, tmp_path) -> None:
    generator = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 320, dtype=np.float64)[None, :, None]
    pixels = np.clip(gradient + generator.normal(0, 25, (240, 320, 3)), 0, 255).astype(np.uint8)
    photo = tmp_path / "bird.jpg"
    Image.fromarray(pixels).save(photo, "JPEG")

    page.goto(servers["photos"])
    page.wait_for_selector("#dropzone:visible")
    assert page.locator("#symbols-panel").is_hidden()
    page.set_input_files("#photo-file", str(photo))
    expect(page.locator("#results .result")).to_have_count(3)
    page.wait_for_selector("#preview-figure:visible")
    names = page.locator("#results .label").all_inner_texts()
    assert set(names) == {"Black footed Albatross", "Laysan Albatross", "Sooty Albatross"}
    widths = page.eval_on_selector_all(".bar-fill", "bars => bars.map(bar => bar.style.width)")
    assert all(width.endswith("%") for width in widths)
    screenshot(page, "browser-photos.png")
    assert page.problems == []


def test_an_uploaded_symbol_is_shown_on_the_canvas_until_a_stroke_or_clear(page, servers) -> None:
    """The canvas is the upload's preview: the whole image, centred; it is never sent as part
    of a drawing, and a stroke or Clear replaces it."""
    symbol = Image.new("L", (32, 32), 255)
    ImageDraw.Draw(symbol).line([(16, 2), (16, 29)], fill=0, width=2)  # A tall bar: |.
    buffer = io.BytesIO()
    symbol.save(buffer, "PNG")
    open_canvas(page, servers)
    upload = {"name": "bar.png", "mimeType": "image/png", "buffer": buffer.getvalue()}
    wait_for_prediction(page, lambda: page.set_input_files("#symbol-file", files=[upload]))
    expect(page.locator("#results .result")).to_have_count(5)
    top, bottom = inked_rows(page)
    assert top < 0.15 and bottom > 0.85, (top, bottom)  # The bar, scaled to the canvas.
    expect(page.locator("#canvas")).to_have_attribute("aria-label", re.compile("bar.png"))
    expect(page.locator("#clear")).to_be_enabled()
    expect(page.locator("#undo")).to_be_disabled()  # Nothing drawn to undo.
    screenshot(page, "browser-symbol-upload.png")
    # A stroke starts a new drawing on a blank canvas: only the dot is sent.
    wait_for_prediction(page, lambda: click_canvas(page, 0.3, 0.5))
    top, bottom = inked_rows(page)
    assert 0.4 < top <= bottom < 0.6, (top, bottom)
    expect(page.locator("#canvas")).not_to_have_attribute("aria-label", re.compile("bar.png"))
    # Clear takes an upload away too, with its results.
    wait_for_prediction(page, lambda: page.set_input_files("#symbol-file", files=[upload]))
    page.locator("#clear").click()
    expect(page.locator("#results .result")).to_have_count(0)
    expect(page.locator("#clear")).to_be_disabled()
    assert page.evaluate(
        """() => {
        const canvas = document.getElementById("canvas");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        return data.every((value) => value === 255);
        }"""
    )
    assert page.problems == []


def test_a_bad_upload_shows_an_error_box(page, servers, tmp_path) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is not an image")
    page.goto(servers["photos"])
    page.wait_for_selector("#dropzone:visible")
    page.set_input_files("#photo-file", str(not_an_image))
    page.wait_for_selector("#error:visible")
    assert "not a readable image" in page.locator("#error").inner_text()
    screenshot(page, "browser-error.png")

    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (30, 120, 200)).save(buffer, "PNG")
    page.set_input_files(
        "#photo-file",
        files=[{"name": "ok.png", "mimeType": "image/png", "buffer": buffer.getvalue()}],
    )
    page.wait_for_selector("#error", state="hidden")
    expect(page.locator("#results .result")).to_have_count(3)

    # A real PNG (a browser previews it) with 5.1 MB of padding after its end.
    padded = buffer.getvalue() + b"\0" * 5_100_000
    too_big = {"name": "huge.png", "mimeType": "image/png", "buffer": padded}
    page.set_input_files("#photo-file", files=[too_big])
    expect(page.locator("#error")).to_contain_text("the limit is 5.0 MB")
    expect(page.locator("#results .result")).to_have_count(0)
    assert page.locator("#preview-figure").is_hidden()  # No preview of a refused file.
    # Chromium logs the deliberate 400 above as a console error; nothing else may go wrong.
    assert [text for text in page.problems if "status of 400" not in text] == []


def test_clearing_while_a_prediction_is_on_its_way_leaves_no_results(page, servers) -> None:
    # A slow PNG encoder (headless Chromium's can take a second): the drawing's snapshot
    # arrives 600 ms after it was asked for.
    page.add_init_script(
        """(() => {
        const original = HTMLCanvasElement.prototype.toBlob;
        HTMLCanvasElement.prototype.toBlob = function (callback, ...rest) {
          original.call(this, (blob) => setTimeout(() => callback(blob), 600), ...rest);
        };
        })()"""
    )
    open_canvas(page, servers)
    for _ in range(2):
        draw_alpha(page)
        page.wait_for_timeout(350)  # The debounce has fired; the snapshot is on its way.
        page.click("#clear")
        page.wait_for_timeout(1200)
        expect(page.locator("#results .result")).to_have_count(0)
        expect(page.locator("#status")).to_have_text("Draw a symbol to see predictions.")
    assert page.problems == []


def test_results_are_not_left_busy_when_a_prediction_is_cut_short(page, servers) -> None:
    """Clear, or a file over the limit, aborts the prediction on its way; the aborted request's
    own clean-up skips a stale request, so the results list stayed aria-busy for good."""
    held: list = []
    page.route("**/api/predict", lambda route: held.append(route))  # No answer ever comes.
    results = page.locator("#results")
    open_canvas(page, servers)
    draw_alpha(page)
    expect(results).to_have_attribute("aria-busy", "true")
    page.click("#clear")
    expect(results).not_to_have_attribute("aria-busy", "true")

    page.goto(servers["photos"])
    page.wait_for_selector("#dropzone:visible")
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (30, 120, 200)).save(buffer, "PNG")
    small = {"name": "ok.png", "mimeType": "image/png", "buffer": buffer.getvalue()}
    page.set_input_files("#photo-file", files=[small])
    expect(results).to_have_attribute("aria-busy", "true")
    too_big = {**small, "name": "huge.png", "buffer": buffer.getvalue() + b"\0" * 5_100_000}
    page.set_input_files("#photo-file", files=[too_big])
    expect(page.locator("#error")).to_contain_text("the limit is 5.0 MB")
    expect(results).not_to_have_attribute("aria-busy", "true")
    assert len(held) == 2


def inked_rows(page) -> list[float]:
    """The first and last rows of the canvas with ink, as fractions of its height."""
    return page.evaluate(
        """() => {
        const canvas = document.getElementById("canvas");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
        const inked = [];
        for (let y = 0; y < canvas.height; y += 1) {
          for (let x = 0; x < canvas.width; x += 4) {
            if (data.data[4 * (y * canvas.width + x)] < 128) {
              inked.push(y / canvas.height);
              break;
            }
          }
        }
        return [Math.min(...inked), Math.max(...inked)];
        }"""
    )


def test_a_second_finger_does_not_join_the_stroke(browser, servers) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 760}, has_touch=True)
    page = context.new_page()
    open_canvas(page, servers)
    box = page.locator("#canvas").bounding_box()
    cdp = context.new_cdp_session(page)

    def touch(kind: str, *points: tuple[float, float]) -> None:
        cdp.send(
            "Input.dispatchTouchEvent",
            {
                "type": kind,
                "touchPoints": [
                    {"x": box["x"] + x * box["width"], "y": box["y"] + y * box["height"], "id": i}
                    for i, (x, y) in enumerate(points)
                ],
            },
        )

    touch("touchStart", (0.2, 0.5))
    touch("touchMove", (0.3, 0.5))
    touch("touchStart", (0.3, 0.5), (0.8, 0.2))  # A second finger lands far away.
    touch("touchMove", (0.4, 0.5), (0.8, 0.9))
    touch("touchMove", (0.5, 0.5), (0.2, 0.9))
    touch("touchEnd")
    expect(page.locator("#results .result")).to_have_count(5)
    # Only the first finger's horizontal line was drawn: no ink far from its row.
    rows = inked_rows(page)
    assert rows[0] > 0.4 and rows[1] < 0.6, rows
    context.close()


def test_results_go_when_the_server_cannot_be_reached(page, tmp_path) -> None:
    url, server, thread = start_server(save_test_model(tmp_path / "s.safetensors", "symbols"))
    page.goto(url)
    page.wait_for_selector("#canvas:visible")
    draw_alpha(page)
    expect(page.locator("#results .result")).to_have_count(5)
    server.should_exit = True
    thread.join(timeout=10)
    draw_alpha(page)
    expect(page.locator("#error")).to_contain_text("Could not reach the server")
    expect(page.locator("#results .result")).to_have_count(0)


def test_on_a_phone_the_best_guess_is_in_view_while_drawing(browser, servers) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 667})
    page = context.new_page()
    open_canvas(page, servers)
    draw_alpha(page)
    near = page.locator("#canvas-status")
    expect(near).to_contain_text("Best guess:")
    box = near.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 667
    screenshot(page, "browser-symbols-phone.png")
    context.close()


def drop_png(page, data: bytes, target: str = "body") -> None:
    """Drop a PNG file with ``data`` on ``target``, as a file dragged from the desktop."""
    page.evaluate(
        """([bytes, target]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], "drop.png", { type: "image/png" }));
        const element = document.querySelector(target);
        for (const type of ["dragenter", "dragover", "drop"]) {
          element.dispatchEvent(
            new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: transfer })
          );
        }
        }""",
        [list(data), target],
    )


def test_a_file_dropped_anywhere_is_used_on_both_pages(page, servers) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (250, 250, 250)).save(buffer, "PNG")
    for kind, count in (("symbols", 5), ("photos", 3)):
        page.goto(servers[kind])
        page.wait_for_selector("#results", state="attached")
        page.wait_for_function(
            "() => !document.getElementById('status').textContent.startsWith('Waiting')"
        )
        drop_png(page, buffer.getvalue(), "footer")
        expect(page.locator("#results .result")).to_have_count(count)
        assert page.url.rstrip("/") == servers[kind]
    assert page.problems == []


def click_canvas(page, x: float, y: float) -> None:
    """A dot at (``x``, ``y``) in 0..1 canvas coordinates: one stroke, one prediction."""
    box = page.locator("#canvas").bounding_box()
    page.mouse.click(box["x"] + x * box["width"], box["y"] + y * box["height"])


def wait_for_prediction(page, action) -> None:
    """Do ``action``, then wait until the prediction it sends is shown (or has failed)."""
    with page.expect_response("**/api/predict"):
        action()
    expect(page.locator("#results")).not_to_have_attribute("aria-busy", "true")


def test_the_focused_copy_button_keeps_the_focus_when_the_results_change(page, servers) -> None:
    open_canvas(page, servers)
    wait_for_prediction(page, lambda: click_canvas(page, 0.3, 0.3))
    wait_for_prediction(page, lambda: click_canvas(page, 0.7, 0.7))
    copies = page.locator("#results button.copy")
    expect(copies).to_have_count(5)
    copies.nth(1).focus()
    copies.nth(1).evaluate("button => { button.dataset.old = 'yes'; }")
    # Ctrl+Z on a Copy button undoes the second dot; the new answer replaces every result.
    wait_for_prediction(page, lambda: page.keyboard.press("Control+z"))
    expect(copies).to_have_count(5)
    expect(page.locator("#results button.copy[data-old]")).to_have_count(0)
    expect(copies.nth(1)).to_be_focused()
    # Undoing the last stroke empties the list: the focus goes to the results heading.
    page.keyboard.press("Control+z")
    expect(copies).to_have_count(0)
    expect(page.locator("#results-title")).to_be_focused()
    assert page.problems == []


def test_undoing_the_last_stroke_from_clear_leaves_the_focus_on_the_canvas(page, servers) -> None:
    open_canvas(page, servers)
    click_canvas(page, 0.5, 0.5)
    expect(page.locator("#clear")).to_be_enabled()
    page.focus("#clear")
    page.keyboard.press("Control+z")  # Clear is disabled with nothing left to clear.
    expect(page.locator("#clear")).to_be_disabled()
    expect(page.locator("#canvas")).to_be_focused()
    assert page.problems == []


def test_ctrl_shift_z_does_not_undo(page, servers) -> None:
    open_canvas(page, servers)
    click_canvas(page, 0.5, 0.5)
    undo = page.locator("#undo")
    expect(undo).to_be_enabled()
    for keys in ("Control+Shift+Z", "Control+Alt+z", "Meta+Shift+Z"):
        page.keyboard.press(keys)  # Redo, or some other command: never an undo.
        assert undo.is_enabled(), keys
    # Ctrl+Z itself still undoes: the keys above did reach the page's handler.
    page.keyboard.press("Control+z")
    expect(undo).to_be_disabled()
    assert page.problems == []


def test_undoing_to_an_empty_canvas_clears_the_error_of_a_failed_prediction(page, servers) -> None:
    page.route(
        "**/api/predict",
        lambda route: route.fulfill(status=500, json={"error": "the model failed"}),
    )
    open_canvas(page, servers)
    error = page.locator("#error")
    for undo in (lambda: page.click("#undo"), lambda: page.keyboard.press("Control+z")):
        wait_for_prediction(page, lambda: click_canvas(page, 0.5, 0.5))
        expect(error).to_have_text("the model failed")
        undo()
        expect(page.locator("#undo")).to_be_disabled()
        expect(error).to_be_hidden()
        expect(page.locator("#status")).to_have_text("Draw a symbol to see predictions.")


def test_a_file_over_the_limit_leaves_the_drawing_and_its_results(page, servers) -> None:
    open_canvas(page, servers)
    wait_for_prediction(page, lambda: click_canvas(page, 0.5, 0.5))
    results = page.locator("#results .result")
    expect(results).to_have_count(5)
    too_big = {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * 5_100_000}
    page.set_input_files("#symbol-file", files=[too_big])
    expect(page.locator("#error")).to_contain_text("the limit is 5.0 MB")
    expect(page.locator("#undo")).to_be_enabled()
    expect(results).to_have_count(5)
    top, bottom = inked_rows(page)
    assert 0.4 < top <= bottom < 0.6, (top, bottom)  # The dot is still drawn.
    assert page.problems == []


def test_a_file_over_the_limit_keeps_its_message_when_the_drawings_answer_comes(
    page, servers
) -> None:
    held: list = []
    page.route("**/api/predict", lambda route: held.append(route))
    open_canvas(page, servers)
    draw_alpha(page)
    expect(page.locator("#results")).to_have_attribute("aria-busy", "true")
    too_big = {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * 5_100_000}
    page.set_input_files("#symbol-file", files=[too_big])
    expect(page.locator("#error")).to_contain_text("the limit is 5.0 MB")
    assert len(held) == 1
    held[0].continue_()  # The drawing's answer arrives after the refusal.
    expect(page.locator("#results .result")).to_have_count(5)
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("the limit is 5.0 MB")
    page.unroute("**/api/predict")
    wait_for_prediction(page, lambda: click_canvas(page, 0.3, 0.3))  # A new one clears it.
    expect(page.locator("#error")).to_be_hidden()
    assert page.problems == []


def test_a_pen_draws_with_its_tip_and_not_with_its_barrel_button(page, servers) -> None:
    open_canvas(page, servers)
    box = page.locator("#canvas").bounding_box()
    cdp = page.context.new_cdp_session(page)

    def pen_stroke(button: str, pressed: int) -> None:
        for kind, x in (("mousePressed", 0.3), ("mouseMoved", 0.5), ("mouseReleased", 0.7)):
            cdp.send(
                "Input.dispatchMouseEvent",
                {
                    "type": kind,
                    "x": box["x"] + x * box["width"],
                    "y": box["y"] + 0.5 * box["height"],
                    "button": button,
                    "buttons": 0 if kind == "mouseReleased" else pressed,
                    "clickCount": 1,
                    "pointerType": "pen",
                },
            )

    undo = page.locator("#undo")
    pen_stroke("right", 2)  # The barrel button held, with the tip off the screen.
    assert undo.is_disabled()
    pen_stroke("left", 1)  # The tip: this one draws.
    expect(undo).to_be_enabled()


def test_the_canvas_follows_a_change_of_device_pixel_ratio(page, servers) -> None:
    """Browser zoom or a move to another screen changes devicePixelRatio but not the canvas's
    size in CSS pixels: the pixel buffer follows, and the drawing stays where it was."""
    open_canvas(page, servers)
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.5 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.8 * box["width"], box["y"] + 0.5 * box["height"], steps=4)
    page.mouse.up()
    canvas = page.locator("#canvas")
    sizes = "canvas => [canvas.clientWidth, canvas.width, devicePixelRatio]"
    css_width, _, _ = canvas.evaluate(sizes)
    assert canvas.evaluate(sizes) == [css_width, css_width, 1]
    cdp = page.context.new_cdp_session(page)
    # Back to 1 as well: the media query is armed again after a change. Headless Chromium
    # sends media query changes on a resize only, so the window's width changes a little too
    # (the canvas keeps its size in CSS pixels, checked below, so ResizeObserver stays quiet).
    for ratio, width in ((2, 1080), (1, 1060)):
        cdp.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 760, "deviceScaleFactor": ratio, "mobile": False},
        )
        page.wait_for_function(f"() => devicePixelRatio === {ratio}")
        expect(canvas).to_have_attribute("width", str(ratio * css_width))
        assert canvas.evaluate(sizes) == [css_width, ratio * css_width, ratio]
        rows = inked_rows(page)
        assert rows[0] > 0.45 and rows[1] < 0.55, rows
    assert page.problems == []


@pytest.mark.parametrize("secure", [True, False], ids=["clipboard-refused", "not-secure"])
def test_copying_falls_back_to_execcommand_keeps_the_focus_and_reports_failure(
    page, servers, secure: bool
) -> None:
    """The Clipboard API refused (or absent outside a secure context): the hidden textarea and
    execCommand("copy") are used, the focus comes back to the Copy button, and a copy that
    execCommand says failed is reported as failed."""
    page.add_init_script(
        """(() => {
        window.copies = [];
        window.copyWorks = true;
        Document.prototype.execCommand = function (command) {
          const focused = document.activeElement;
          window.copies.push([command, focused.tagName, focused.value]);
          return window.copyWorks;
        };
        Clipboard.prototype.writeText = () =>
          Promise.reject(new DOMException("Write permission denied.", "NotAllowedError"));
        })()"""
        + ("" if secure else "; Object.defineProperty(window, 'isSecureContext', {value: false})")
    )
    open_canvas(page, servers)
    click_canvas(page, 0.5, 0.5)
    copies = page.locator("#results button.copy")
    expect(copies).to_have_count(5)
    assert page.evaluate("() => window.isSecureContext") is secure
    label = page.locator("#results code.latex").first.inner_text()
    copies.first.focus()
    page.keyboard.press("Enter")
    expect(copies.first).to_have_text("Copied")
    expect(copies.first).to_be_focused()
    assert page.evaluate("() => window.copies") == [["copy", "TEXTAREA", label]]
    assert page.locator("#error").is_hidden()

    page.evaluate("() => { window.copyWorks = false; }")
    copies.nth(1).focus()
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_contain_text("Could not copy")
    expect(copies.nth(1)).to_have_text("Copy")
    expect(copies.nth(1)).to_be_focused()
    assert len(page.evaluate("() => window.copies")) == 2
    assert page.locator("textarea").count() == 0
    assert page.problems == []


@pytest.mark.parametrize(
    "script",
    [{"status": 404, "body": "not found"}, {"status": 200, "body": "const broken = ;"}],
    ids=["missing", "syntax-error"],
)
def test_a_page_whose_script_did_not_run_says_so(page, servers, script: dict) -> None:
    page.route(
        "**/static/app.js",
        lambda route: route.fulfill(content_type="text/javascript", **script),
    )

    # The page reveals the notice by a CSS animation 5 s after loading; here without the
    # wait, which is all that changes (the check that the delay is there is below).
    def without_the_delay(route) -> None:
        css = route.fetch().text() + "\n.script-notice { animation-delay: 0s; }\n"
        route.fulfill(content_type="text/css", body=css)

    page.route("**/static/app.css", without_the_delay)
    page.goto(servers["symbols"])
    notice = page.locator("#script-notice")
    expect(notice).to_be_visible(timeout=15_000)  # By CSS alone: no script ran.
    expect(notice).to_contain_text("script did not load")
    expect(notice.locator("a")).to_have_attribute("href", "/docs")
    expect(page.locator("#model-info")).to_have_text("Loading the model…")


def test_the_script_notice_waits_a_few_seconds_before_it_shows() -> None:
    """A slow script must not flash the notice: the page's own rule delays it by 5 s."""
    css = (Path(cnnkit.__file__).parent / "web" / "static" / "app.css").read_text()
    rule = css[css.index(".script-notice {") :].split("}", 1)[0]
    assert "animation: reveal-script-notice 0s 5s forwards;" in rule
    assert "visibility: hidden;" in rule


def test_the_script_removes_the_notice_that_it_did_not_load(page, servers) -> None:
    for kind in ("symbols", "photos"):
        assert 'id="script-notice"' in page.request.get(servers[kind]).text()
        page.goto(servers[kind])
        expect(page.locator("#model-info")).not_to_have_text("Loading the model…")
        expect(page.locator("#script-notice")).to_have_count(0)
    assert page.problems == []


def test_an_unexpected_model_description_is_reported(page, servers) -> None:
    """A 200 from /api/model that is not JSON, or not a model description, is an error."""
    bodies = [
        "<html>Bad gateway</html>",
        "null",
        "{}",
        '"symbols"',
        '{"architecture": "symbol_cnn", "num_classes": 8}',
        '{"architecture": "symbol_cnn", "kind": "symbols"}',
        '{"architecture": "symbol_cnn", "kind": "symbols", "num_classes": "8"}',
        '{"kind": "photos", "num_classes": 3}',
    ]
    answer = {"body": ""}
    page.route(
        "**/api/model",
        lambda route: route.fulfill(status=200, content_type="application/json", **answer),
    )
    for answer["body"] in bodies:
        page.goto(servers["symbols"])
        expect(page.locator("#error")).to_have_text(
            "The server sent an unexpected answer for the model description (/api/model); "
            "reload the page, or check the server."
        )
        expect(page.locator("#model-info")).to_have_text("No model information.")
        expect(page.locator("#status")).to_have_text("Unavailable.")
        assert page.locator("#symbols-panel").is_hidden(), answer
        assert page.locator("#photos-panel").is_hidden(), answer
        assert "undefined" not in page.locator("body").inner_text(), answer
    assert page.problems == []


def test_a_model_description_that_cannot_be_fetched_is_reported(page, servers) -> None:
    page.route("**/api/model", lambda route: route.abort())
    page.goto(servers["photos"])
    expect(page.locator("#error")).to_contain_text("Could not reach the server")
    expect(page.locator("#model-info")).to_have_text("No model information.")
    expect(page.locator("#status")).to_have_text("Unavailable.")


def test_an_unexpected_prediction_answer_is_reported(page, servers) -> None:
    answer: dict[str, str | None] = {"body": None}  # None: the server's own answer.

    def respond(route) -> None:
        if answer["body"] is None:
            route.fallback()
        else:
            route.fulfill(status=200, content_type="application/json", body=answer["body"])

    page.route("**/api/predict", respond)
    open_canvas(page, servers)
    results, error = page.locator("#results .result"), page.locator("#error")
    # Not JSON, no predictions, a prediction without its confidence (each costs two
    # predictions; isAnswer in app.js checks the rest of the shape the same way).
    bodies = ["not JSON", '{"predictions": []}', '{"predictions": [{"label": "\\\\alpha"}]}']
    for body in bodies:
        for answer["body"] in (None, body):  # A good answer first clears the error box.
            if page.locator("#undo").is_enabled():
                page.keyboard.press("Control+z")
            wait_for_prediction(page, lambda: click_canvas(page, 0.5, 0.5))
            if answer["body"] is None:
                expect(results).to_have_count(5)
                expect(error).to_be_hidden()
        expect(error).to_have_text(
            "The server sent an unexpected answer to the prediction request; try again, or "
            "reload the page.",
        )
        expect(results).to_have_count(0)
        expect(page.locator("#status")).to_have_text("No prediction.")
    assert page.problems == []


def test_a_prediction_without_a_rendered_symbol_shows_no_image(page, servers) -> None:
    """The server leaves out ``render`` for a very long label; a render that fails (an older
    server's URL for such a label) leaves no broken image either."""

    def respond(route) -> None:
        answer = route.fetch().json()
        del answer["predictions"][0]["render"]
        answer["predictions"][1]["render"] = None
        answer["predictions"][2]["render"] = "/api/render?latex=" + "x" * 1000  # Refused.
        route.fulfill(json=answer)

    page.route("**/api/predict", respond)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    open_canvas(page, servers)
    click_canvas(page, 0.5, 0.5)
    items = page.locator("#results .result")
    expect(items).to_have_count(5)
    for rank in range(3):
        expect(items.nth(rank).locator("img")).to_have_count(0)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img.symbol')]"
        ".every(image => image.complete && image.naturalWidth > 0)"
    )
    expect(page.locator("#results img.symbol")).to_have_count(2)
    assert not [url for url in requested if url.endswith(("/undefined", "/null"))], requested
    assert page.locator("#error").is_hidden()
