"""End to end: the real server (``cnnkit serve`` with the bundled model) under a bounded loopback
flood of malformed requests mixed with valid ones; the flood is benchmarks/server_faults.py's."""

from __future__ import annotations

import http.client
import importlib
import socket
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cnnkit.web.app import MAX_CONCURRENT_REQUESTS

MAX_RSS_GROWTH_MB = 100.0


@pytest.fixture(scope="module")
def server_faults(repo_root: Path) -> ModuleType:
    """The benchmark module (``benchmarks`` is not installed, so import it from the repository)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(repo_root))
        return importlib.import_module("benchmarks.server_faults")


@pytest.fixture(scope="module")
def figures(server_faults: ModuleType) -> dict[str, Any]:
    """One flood of 150 requests from 16 clients against a fresh server, run once per module."""
    from cnnkit.inference.bundled import bundled_model_path

    config = server_faults.FloodConfig(
        num_requests=150, concurrency=16, trickle_seconds=0.5, stall_seconds=1.0
    )
    return server_faults.run_fault_check(str(bundled_model_path()), config)


def test_every_fault_category_was_sent(figures: dict[str, Any], server_faults: ModuleType) -> None:
    assert set(figures["categories"]) == set(server_faults.WEIGHTS)
    assert all(report["sent"] > 0 for report in figures["categories"].values())


def test_every_request_gets_its_expected_answer(figures: dict[str, Any]) -> None:
    problems = {
        name: report["statuses"]
        for name, report in figures["categories"].items()
        if report["unexpected"] or report["connection_errors"]
    }
    assert problems == {}


def test_valid_predictions_stay_correct_during_the_flood(figures: dict[str, Any]) -> None:
    assert figures["valid_checked"] >= 40
    assert figures["valid_correct"] == figures["valid_checked"]


def test_the_server_stays_up_and_healthy(figures: dict[str, Any]) -> None:
    assert figures["server_alive"]
    assert figures["healthz_ok"]
    assert figures["prediction_after_ok"]


def test_the_server_logs_no_errors(figures: dict[str, Any]) -> None:
    # A client hanging up mid-upload once logged two tracebacks as an "unhandled error".
    assert figures["server_error_lines"] == 0, figures["server_error_sample"]


def test_memory_stays_bounded(figures: dict[str, Any]) -> None:
    assert figures["rss_before_mb"] > 0
    assert figures["rss_growth_mb"] < MAX_RSS_GROWTH_MB, (
        f"server RSS grew from {figures['rss_before_mb']} MB to {figures['rss_after_mb']} MB"
    )


def test_idle_connections_do_not_turn_requests_away(server_faults: ModuleType) -> None:
    """More idle sockets than the in-flight limit: uvicorn's connection limit once gave 503s."""
    from cnnkit.inference.bundled import bundled_model_path

    port = server_faults.free_port()
    server = server_faults.start_server(str(bundled_model_path()), port, 1)
    idle: list[socket.socket] = []
    try:
        idle = [
            socket.create_connection(("127.0.0.1", port))
            for _ in range(MAX_CONCURRENT_REQUESTS + 16)
        ]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        for sock in idle:
            sock.close()
        server.terminate()
        server.wait(timeout=30)
