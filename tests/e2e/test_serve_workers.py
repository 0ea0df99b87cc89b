"""``cnnkit serve --workers 2``: several server processes answer on one port."""

from __future__ import annotations

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageDraw
from tests.conftest import subprocess_env

from cnnkit.inference.bundled import bundled_int8_path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _png() -> bytes:
    image = Image.new("L", (32, 32), 255)
    ImageDraw.Draw(image).line([(4, 4), (28, 28)], fill=0, width=2)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "image/png"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _healthy(server: subprocess.Popen, port: int) -> dict:
    """Wait for the server's /healthz to answer 200 (at most 120 s), and return its body."""
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, server.stderr.read()
        try:
            status, health = _request(port, "GET", "/healthz")
            if status == 200:
                return health
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _stop(server: subprocess.Popen) -> None:
    """Ctrl-C the server, or kill it if it does not stop within 30 s."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def test_two_server_processes_share_the_port_and_agree():
    port = _free_port()
    env = subprocess_env()
    command = [sys.executable, "-m", "cnnkit", "serve", "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        health = _healthy(server, port)
        # Without a model, each process runs the bundled model's int8 export (where
        # onnxruntime is installed, as `make test` installs it).
        expected = "onnxruntime int8" if bundled_int8_path() else "pytorch"
        assert health["model"]["runtime"] == expected
        answers = [_request(port, "POST", "/api/predict", _png()) for _ in range(12)]
        assert all(status == 200 for status, _ in answers)
        labels = {tuple(p["label"] for p in body["predictions"]) for _, body in answers}
        assert len(labels) == 1  # Every process loaded the same model.
        assert len(answers[0][1]["predictions"]) == 5
    finally:
        _stop(server)
    assert server.returncode == 0


def test_serve_refuses_zero_workers():
    from cnnkit.web.server import serve

    with pytest.raises(ValueError, match="workers must be >= 1"):
        serve(None, workers=0)


def test_port_0_prints_the_port_the_system_picked_and_serves_there():
    command = [sys.executable, "-m", "cnnkit", "serve", "--port", "0"]
    server = subprocess.Popen(
        command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first = server.stdout.readline()
        assert first.startswith("Serving on http://127.0.0.1:"), server.stderr.read()
        port = int(first.split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0
        _healthy(server, port)
    finally:
        _stop(server)
