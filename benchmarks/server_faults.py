"""Fault benchmark for ``cnnkit serve``: a bounded loopback flood of malformed and valid requests.

Starts the server in a subprocess with the bundled model (as ``cnnkit serve`` would), then sends
a fixed number of requests from concurrent asyncio clients on raw sockets. Valid predictions
(checked against a local reference) are mixed with oversize bodies (declared and chunked), slow
and stalled clients, idle connections, invalid multipart, garbage, truncated images and bad
base64. Prints the outcome of each category, whether the server stayed up and answered correctly,
and the server's resident memory (RSS) before, at peak and after.

    python -m benchmarks.server_faults --requests 600 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.record import record_result
from benchmarks.serve_load import free_port, multipart_body, start_server, synthetic_images

HOST = "127.0.0.1"
MAX_UPLOAD_BYTES = 5_000_000  # The server's default (web.app.DEFAULT_MAX_UPLOAD_BYTES).
OVERSIZE_BYTES = 6_500_000  # Over the limit for raw and multipart bodies, margin included.
NO_RESPONSE = 0  # The client hung up, or the server closed, before any response.
# A probability may differ in the last float digits between a batched server and a lone reference.
CONFIDENCE_TOLERANCE = 1e-4
# How often each category appears in the flood.
WEIGHTS = {
    "valid": 4,
    "oversize_declared": 1,
    "oversize_chunked": 1,
    "slow_body": 1,
    "stalled_body": 1,
    "idle_connection": 1,
    "invalid_multipart": 2,
    "garbage": 2,
    "truncated_image": 1,
    "invalid_base64": 1,
}


@dataclass(frozen=True)
class FloodConfig:
    """The size and pace of a flood; every client is bounded by ``request_timeout`` seconds."""

    num_requests: int = 600
    concurrency: int = 16
    trickle_seconds: float = 1.0
    stall_seconds: float = 1.5
    request_timeout: float = 20.0
    seed: int = 0


@dataclass
class ReferenceImages:
    """Encoded PNGs and the probabilities ``[N, num_classes]`` a lone local model gives them."""

    images: list[bytes]
    probabilities: np.ndarray
    class_names: tuple[str, ...]


@dataclass
class Outcome:
    """What one client saw: an HTTP status (``NO_RESPONSE``, or None for a connection error)."""

    status: int | None
    expected: frozenset[int]
    error: str = ""
    correct: bool | None = None
    seconds: float = 0.0


@dataclass
class CategoryReport:
    sent: int = 0
    expected: int = 0
    unexpected: int = 0
    connection_errors: int = 0
    wrong_predictions: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class FloodReport:
    categories: dict[str, CategoryReport]
    seconds: float
    valid_checked: int
    valid_correct: int
    valid_p50_ms: float
    valid_max_ms: float

    @property
    def unexpected(self) -> int:
        return sum(report.unexpected for report in self.categories.values())

    @property
    def connection_errors(self) -> int:
        return sum(report.connection_errors for report in self.categories.values())


# ----- Raw HTTP over asyncio streams -----


def request_head(content_type: str | None, length: int | None, chunked: bool = False) -> bytes:
    lines = ["POST /api/predict HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def request_bytes(body: bytes, content_type: str | None) -> bytes:
    return request_head(content_type, len(body)) + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one response; ``NO_RESPONSE`` if the server closed before one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial:
            raise ConnectionError("the server closed inside a response head") from None
        return NO_RESPONSE, b""
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    )
    length = headers.get("content-length")
    body = await (reader.readexactly(int(length)) if length else reader.read())
    return int(lines[0].split()[1]), body


@contextlib.asynccontextmanager
async def connection(port: int):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def exchange(port: int, data: bytes) -> tuple[int, bytes]:
    async with connection(port) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return await read_response(reader)


async def wait_for_response(reader: asyncio.StreamReader, seconds: float) -> int:
    """The status the server sends within ``seconds``, else ``NO_RESPONSE`` (the client quits)."""
    try:
        status, _ = await asyncio.wait_for(read_response(reader), seconds)
    except asyncio.TimeoutError:
        return NO_RESPONSE
    return status


# ----- The request categories -----


def prediction_is_correct(body: bytes, reference: np.ndarray, class_names: tuple[str, ...]) -> bool:
    """Whether the ranked predictions are the reference's top-k (ties may swap places)."""
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return False
    best = np.sort(reference)[::-1][: len(predictions)]
    return len(predictions) == 5 and all(
        entry["label"] == class_names[entry["index"]]
        and abs(entry["confidence"] - reference[entry["index"]]) <= CONFIDENCE_TOLERANCE
        and abs(entry["confidence"] - best[rank]) <= CONFIDENCE_TOLERANCE
        for rank, entry in enumerate(predictions)
    )


def valid_request(references: ReferenceImages, index: int) -> tuple[bytes, int]:
    """A valid prediction request (multipart, JSON base64 or raw PNG) and its image's index."""
    image_index = index % len(references.images)
    image = references.images[image_index]
    variant = index % 3
    if variant == 0:
        body, content_type = multipart_body(image, "upload")
    elif variant == 1:
        body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
        content_type = "application/json"
    else:
        body, content_type = image, "image/png"
    return request_bytes(body, content_type), image_index


async def send_valid(port: int, references: ReferenceImages, index: int) -> Outcome:
    data, image_index = valid_request(references, index)
    status, body = await exchange(port, data)
    correct = status == 200 and prediction_is_correct(
        body, references.probabilities[image_index], references.class_names
    )
    return Outcome(status, frozenset({200}), correct=correct)


async def send_slow_body(
    port: int, references: ReferenceImages, index: int, config: FloodConfig
) -> Outcome:
    """A valid request whose bytes trickle in over ``trickle_seconds``."""
    data, image_index = valid_request(references, index)
    pieces = 10
    step = -(-len(data) // pieces)
    async with connection(port) as (reader, writer):
        for start in range(0, len(data), step):
            writer.write(data[start : start + step])
            await writer.drain()
            await asyncio.sleep(config.trickle_seconds / pieces)
        status, body = await read_response(reader)
    correct = status == 200 and prediction_is_correct(
        body, references.probabilities[image_index], references.class_names
    )
    return Outcome(status, frozenset({200}), correct=correct)


async def send_stalled(port: int, references: ReferenceImages, index: int, config: FloodConfig):
    """Headers and half a body, then silence until the client gives up and hangs up."""
    data, _ = valid_request(references, index)
    head_end = data.index(b"\r\n\r\n") + 4
    partial = data[: head_end + (len(data) - head_end) // 2]
    async with connection(port) as (reader, writer):
        writer.write(partial)
        await writer.drain()
        status = await wait_for_response(reader, config.stall_seconds)
    return Outcome(status, frozenset({NO_RESPONSE, 408}))


async def send_idle(port: int, index: int, config: FloodConfig) -> Outcome:
    """A connection that sends nothing (or half a request line), then hangs up."""
    async with connection(port) as (reader, writer):
        if index % 2:
            writer.write(b"POST /api/pre")
            await writer.drain()
        status = await wait_for_response(reader, config.stall_seconds)
    return Outcome(status, frozenset({NO_RESPONSE, 400, 408}))


async def send_oversize_declared(port: int, index: int) -> Outcome:
    """A Content-Length over the limit, then the first 16 kB of the body."""
    content_type = "image/png" if index % 2 else "multipart/form-data; boundary=b"
    head = request_head(content_type, OVERSIZE_BYTES)
    status, _ = await exchange(port, head + b"\x00" * 16_384)
    return Outcome(status, frozenset({413}))


async def send_oversize_chunked(port: int, index: int) -> Outcome:
    """A chunked body over the limit, sent while the response is read (it may come early)."""
    content_type = "image/png" if index % 2 else "multipart/form-data; boundary=b"
    chunk = b"\x00" * 65_536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"

    async with connection(port) as (reader, writer):

        async def send_body() -> None:
            writer.write(request_head(content_type, None, chunked=True))
            for _ in range(-(-OVERSIZE_BYTES // len(chunk))):
                writer.write(frame)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        sender = asyncio.ensure_future(send_body())
        try:
            status, _ = await read_response(reader)
        finally:
            sender.cancel()
            # A server that answered and closed early makes the rest of the upload fail: expected.
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
    return Outcome(status, frozenset({413}))


def invalid_multipart(image: bytes, variant: int) -> tuple[bytes, str]:
    body, content_type = multipart_body(image, "upload")
    boundary = content_type.split("boundary=", 1)[1]
    if variant == 0:  # The header names a boundary the body never uses.
        return body, "multipart/form-data; boundary=" + uuid.uuid4().hex
    if variant == 1:  # No boundary at all.
        return body, "multipart/form-data"
    if variant == 2:  # Cut off inside the file part.
        return body[: len(body) - len(image) // 2 - 10], content_type
    if variant == 3:  # No 'file' field.
        part = f'--{boundary}\r\nContent-Disposition: form-data; name="source"\r\n\r\nupload\r\n'
        return f"{part}--{boundary}--\r\n".encode(), content_type
    # A part without a name.
    part = f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\n"
    return part.encode() + image + f"\r\n--{boundary}--\r\n".encode(), content_type


def garbage_request(index: int) -> tuple[bytes, frozenset[int]]:
    noise = random.Random(index).randbytes(1 + index % 20_000)
    variant = index % 5
    if variant == 3:  # Not HTTP at all.
        return noise + b"\r\n\r\n", frozenset({400})
    content_type, expected = [
        ("image/png", 400),
        ("multipart/form-data; boundary=x", 400),
        ("application/json", 400),
        None,
        ("text/plain", 415),
    ][variant]
    return request_bytes(noise, content_type), frozenset({expected})


def truncated_image_request(image: bytes, index: int) -> bytes:
    fraction = (0.1, 0.3, 0.5, 0.7)[index % 4]
    # Past the signature and header chunk, and short of the pixel data's end: a PNG missing only
    # its last ~20 bytes (checksums, IEND) still decodes to the full image, and PIL accepts it.
    cut = image[: min(max(34, int(len(image) * fraction)), len(image) - 32)]
    if index % 2:
        return request_bytes(cut, "image/png")
    return request_bytes(*multipart_body(cut, "upload"))


def invalid_base64_request(image: bytes, index: int) -> bytes:
    encoded = base64.b64encode(image).decode()
    text = [
        encoded[:10] + "!*%" + encoded[10:],  # Characters outside the alphabet.
        encoded + "A",  # Wrong length.
        "data:image/png," + encoded,  # A data URL that is not base64.
        "data:image/png;base64,@@@@",
    ][index % 4]
    return request_bytes(json.dumps({"image": text}).encode(), "application/json")


async def send_fixed(port: int, data: bytes, expected: frozenset[int]) -> Outcome:
    status, _ = await exchange(port, data)
    return Outcome(status, expected)


def case_for(
    category: str, index: int, port: int, references: ReferenceImages, config: FloodConfig
) -> Awaitable[Outcome]:
    image = references.images[index % len(references.images)]
    if category == "valid":
        return send_valid(port, references, index)
    if category == "slow_body":
        return send_slow_body(port, references, index, config)
    if category == "stalled_body":
        return send_stalled(port, references, index, config)
    if category == "idle_connection":
        return send_idle(port, index, config)
    if category == "oversize_declared":
        return send_oversize_declared(port, index)
    if category == "oversize_chunked":
        return send_oversize_chunked(port, index)
    if category == "invalid_multipart":
        body, content_type = invalid_multipart(image, index % 5)
        return send_fixed(port, request_bytes(body, content_type), frozenset({400}))
    if category == "garbage":
        return send_fixed(port, *garbage_request(index))
    if category == "truncated_image":
        return send_fixed(port, truncated_image_request(image, index), frozenset({400}))
    if category == "invalid_base64":
        return send_fixed(port, invalid_base64_request(image, index), frozenset({400}))
    raise ValueError(f"unknown category {category!r}")


# ----- The flood -----


def load_references(model: str, num_images: int = 16) -> ReferenceImages:
    """Distinct symbol PNGs and what a local copy of the served model predicts for each."""
    from cnnkit.data.image import decode_image
    from cnnkit.data.prepare import prepare_image
    from cnnkit.web.server import load_predictor

    predictor = load_predictor(model)
    images = synthetic_images("symbols", num_images, seed=7)
    preprocessing = predictor.metadata.preprocessing
    arrays = [prepare_image(decode_image(image), preprocessing) for image in images]
    probabilities = np.concatenate([predictor.probabilities(np.stack([array])) for array in arrays])
    return ReferenceImages(images, probabilities, predictor.metadata.class_names)


def build_schedule(num_requests: int, seed: int) -> list[str]:
    """The categories in a seeded random order, in proportion to ``WEIGHTS``."""
    cycle = [name for name, weight in WEIGHTS.items() for _ in range(weight)]
    schedule = (cycle * (num_requests // len(cycle) + 1))[:num_requests]
    random.Random(seed).shuffle(schedule)
    return schedule


async def run_case(case: Awaitable[Outcome], timeout: float) -> Outcome:
    began = time.perf_counter()
    try:
        outcome = await asyncio.wait_for(case, timeout)
    except asyncio.TimeoutError:
        outcome = Outcome(None, frozenset(), error="timeout")
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
        outcome = Outcome(None, frozenset(), error=type(error).__name__)
    outcome.seconds = time.perf_counter() - began
    return outcome


async def flood(port: int, references: ReferenceImages, config: FloodConfig) -> FloodReport:
    """Send ``config.num_requests`` requests over ``config.concurrency`` clients; tally them."""
    schedule = build_schedule(config.num_requests, config.seed)
    pending = iter(enumerate(schedule))
    results: list[tuple[str, Outcome]] = []

    async def client() -> None:
        for index, category in pending:
            case = case_for(category, index, port, references, config)
            results.append((category, await run_case(case, config.request_timeout)))

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(config.concurrency)))
    seconds = time.perf_counter() - began
    return tally(results, seconds)


def tally(results: list[tuple[str, Outcome]], seconds: float) -> FloodReport:
    categories = {name: CategoryReport() for name in WEIGHTS}
    statuses: dict[str, Counter] = {name: Counter() for name in WEIGHTS}
    valid_seconds = []
    for category, outcome in results:
        report = categories[category]
        report.sent += 1
        if outcome.status is None:
            report.connection_errors += 1
            statuses[category][outcome.error] += 1
            continue
        statuses[category][str(outcome.status or "no response")] += 1
        if outcome.status in outcome.expected and outcome.correct is not False:
            report.expected += 1
        else:
            report.unexpected += 1
        if outcome.correct is False:
            report.wrong_predictions += 1
        if category == "valid":
            valid_seconds.append(outcome.seconds)
    for name, counter in statuses.items():
        categories[name].statuses = dict(sorted(counter.items()))
    checked = [outcome.correct for _, outcome in results if outcome.correct is not None]
    return FloodReport(
        categories,
        round(seconds, 2),
        len(checked),
        sum(checked),
        round(statistics.median(valid_seconds) * 1000, 1) if valid_seconds else float("nan"),
        round(max(valid_seconds) * 1000, 1) if valid_seconds else float("nan"),
    )


# ----- The server process -----


def rss_megabytes(pid: int) -> float:
    """Resident memory of a process in MB (psutil where installed, else /proc on Linux)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise OSError(f"no VmRSS for process {pid}") from None
    return psutil.Process(pid).memory_info().rss / 2**20


async def sample_peak(pid: int, peak: list[float], interval: float = 0.05) -> None:
    while True:
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], rss_megabytes(pid))
        await asyncio.sleep(interval)


async def check_server(port: int, references: ReferenceImages) -> dict[str, Any]:
    """Health and one checked prediction after the flood."""
    try:
        status, body = await asyncio.wait_for(
            exchange(port, f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()), 10
        )
        healthy = status == 200 and json.loads(body).get("status") == "ok"
        answer = await asyncio.wait_for(send_valid(port, references, 0), 10)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return {"healthz_ok": False, "prediction_after_ok": False}
    return {"healthz_ok": healthy, "prediction_after_ok": bool(answer.correct)}


async def measure_flood(pid: int, port: int, references: ReferenceImages, config: FloodConfig):
    for index in range(32):  # Warm up, so that "before" includes the memory of steady serving.
        await run_case(send_valid(port, references, index), config.request_timeout)
    before = rss_megabytes(pid)
    peak = [before]
    sampler = asyncio.ensure_future(sample_peak(pid, peak))
    try:
        report = await flood(port, references, config)
    finally:
        sampler.cancel()
    await asyncio.sleep(1.0)  # Let the server finish closing connections and freeing bodies.
    after = rss_megabytes(pid)
    memory = {"rss_before_mb": before, "rss_peak_mb": max(peak[0], after), "rss_after_mb": after}
    return report, {name: round(value, 1) for name, value in memory.items()}


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr to ``path``; a child started inside inherits it."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        for descriptor, original in zip((1, 2), saved, strict=True):
            os.dup2(original, descriptor)
            os.close(original)


def server_errors(log: str) -> list[str]:
    """The lines of a server log that report an error or a traceback."""
    return [line for line in log.splitlines() if line.startswith(("ERROR", "Traceback"))]


def run_fault_check(model: str, config: FloodConfig, torch_threads: int = 0) -> dict[str, Any]:
    """Start a server, flood it, check it afterwards, stop it; the figures as a dict."""
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(1) as executor:
        # The reference model loads while the server starts: both spend most time importing.
        pending_references = executor.submit(load_references, model)
        log_path = Path(folder) / "server.log"
        port = free_port()
        with output_to(log_path):
            server = start_server(model, port, torch_threads)
        try:
            references = pending_references.result()
            report, memory = asyncio.run(measure_flood(server.pid, port, references, config))
            after = asyncio.run(check_server(port, references))
            server_alive = server.poll() is None
        finally:
            server.terminate()
            server.wait(timeout=30)
        errors = server_errors(log_path.read_text(errors="replace"))
    figures: dict[str, Any] = {
        "requests": config.num_requests,
        "concurrency": config.concurrency,
        "flood_seconds": report.seconds,
        "unexpected": report.unexpected,
        "connection_errors": report.connection_errors,
        "valid_checked": report.valid_checked,
        "valid_correct": report.valid_correct,
        "valid_p50_ms": report.valid_p50_ms,
        "valid_max_ms": report.valid_max_ms,
        "server_alive": server_alive,
        **after,
        "server_error_lines": len(errors),
        "server_error_sample": errors[:5],
        **memory,
        "rss_growth_mb": round(memory["rss_after_mb"] - memory["rss_before_mb"], 1),
        "categories": {name: asdict(value) for name, value in report.categories.items()},
    }
    figures["passed"] = fault_check_passed(figures)
    return figures


def fault_check_passed(figures: dict[str, Any], max_rss_growth_mb: float = 100.0) -> bool:
    return (
        figures["unexpected"] == 0
        and figures["connection_errors"] == 0
        and figures["valid_checked"] > 0
        and figures["valid_correct"] == figures["valid_checked"]
        and figures["server_alive"]
        and figures["healthz_ok"]
        and figures["prediction_after_ok"]
        and figures["server_error_lines"] == 0
        and figures["rss_growth_mb"] < max_rss_growth_mb
    )


def print_figures(figures: dict[str, Any]) -> None:
    header = f"{'category':<18} {'sent':>5} {'expected':>9} {'unexpected':>11} {'conn err':>9}"
    print(header + "  statuses")
    for name, report in figures["categories"].items():
        print(
            f"{name:<18} {report['sent']:>5} {report['expected']:>9} {report['unexpected']:>11} "
            f"{report['connection_errors']:>9}  {report['statuses']}"
        )
    print(
        f"{figures['requests']} requests over {figures['concurrency']} clients in "
        f"{figures['flood_seconds']} s; valid predictions correct: {figures['valid_correct']}/"
        f"{figures['valid_checked']} (p50 {figures['valid_p50_ms']} ms, max "
        f"{figures['valid_max_ms']} ms)"
    )
    print(
        f"server alive: {figures['server_alive']}, healthz after: {figures['healthz_ok']}, "
        f"prediction after: {figures['prediction_after_ok']}, error lines in the server log: "
        f"{figures['server_error_lines']} {figures['server_error_sample']}"
    )
    print(
        f"server RSS: before {figures['rss_before_mb']} MB, peak {figures['rss_peak_mb']} MB, "
        f"after {figures['rss_after_mb']} MB (growth {figures['rss_growth_mb']} MB)"
    )
    print("PASSED" if figures["passed"] else "FAILED")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file (default: the bundled symbol model)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--name", default="server_faults", help="results file name")
    arguments = parser.parse_args()
    from benchmarks.serve_load import resolve_model

    model = resolve_model(arguments.model)
    config = FloodConfig(arguments.requests, arguments.concurrency, seed=arguments.seed)
    figures = run_fault_check(model, config, arguments.torch_threads)
    print_figures(figures)
    print(f"wrote {record_result(arguments.name, figures)}")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
