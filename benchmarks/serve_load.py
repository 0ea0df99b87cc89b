"""Load benchmark for ``cnnkit serve``: latency and throughput of POST /api/predict.

Starts the server in a subprocess on loopback (as ``cnnkit serve`` would), then fires a fixed
number of requests from concurrent clients, each with its own keep-alive connection, and
prints p50/p90/p99 latency, throughput and the error count.

Example:
    python benchmarks/serve_load.py --model runs/hasy/model.safetensors
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BARS = {"p50_ms": 10.0, "p99_ms": 50.0, "errors": 0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resolve_model(model: str | None) -> str:
    if model:
        return model
    from cnnkit.inference.bundled import bundled_model_path

    try:
        return str(bundled_model_path())
    except FileNotFoundError as error:
        raise SystemExit(f"{error}\nPass --model PATH to benchmark a model file.") from None


def synthetic_images(kind: str, count: int, seed: int = 0) -> list[bytes]:
    """Distinct PNG drawings (symbols) or JPEG photos, so no two requests are identical."""
    generator = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        if kind == "symbols":
            image = Image.new("L", (32, 32), 255)
            points = [tuple(int(v) for v in generator.integers(0, 32, 2)) for _ in range(5)]
            ImageDraw.Draw(image).line(points, fill=0, width=2)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
        else:
            pixels = generator.integers(0, 256, (240, 320, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        images.append(buffer.getvalue())
    return images


def multipart_body(image: bytes, source: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="source"\r\n\r\n{source}\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n5\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n",
    ]
    body = "".join(parts).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(
    model: str | None, port: int, torch_threads: int, workers: int = 1
) -> subprocess.Popen:
    """``cnnkit serve [MODEL]`` in a subprocess (``None``: no MODEL, as ``cnnkit serve`` runs
    it); with ``workers > 1`` each process picks its threads."""
    code = (
        "import logging, sys, torch; logging.basicConfig(level=logging.WARNING);"
        "threads = int(sys.argv[3]); threads > 0 and torch.set_num_threads(threads);"
        "from cnnkit.web.server import serve;"
        "serve(sys.argv[1] or None, host='127.0.0.1', port=int(sys.argv[2]),"
        " workers=int(sys.argv[4]))"
    )
    environment = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[1] / "src")
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [source_root, environment.get("PYTHONPATH")])
    )
    command = [sys.executable, "-c", code, model or "", str(port), str(torch_threads), str(workers)]
    process = subprocess.Popen(command, env=environment)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become healthy within 180 s")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far of a process and its descendants (Linux), else NaN."""

    def stat_fields(process: int) -> list[str]:
        return Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()

    try:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int(stat_fields(int(entry.name))[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = {pid}, [pid]
        while frontier:
            parent = frontier.pop()
            children = [child for child, ppid in parents.items() if ppid == parent]
            tree.update(children)
            frontier.extend(children)
        ticks = 0
        for process in tree:
            try:
                fields = stat_fields(process)
                ticks += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return float("nan")
    return ticks / os.sysconf("SC_CLK_TCK")


def request_bytes(port: int, body: bytes, content_type: str) -> bytes:
    """One keep-alive ``POST /api/predict`` as raw HTTP/1.1 bytes."""
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def run_clients(
    port: int, bodies: list[tuple[bytes, str]], num_requests: int, concurrency: int
) -> tuple[list[float], int, float]:
    """Send ``num_requests`` from ``concurrency`` keep-alive connections at once.

    The clients are coroutines on one event loop writing prebuilt request bytes, so the load
    generator itself costs little CPU (like ``wrk``) and the figures describe the server.
    Returns the latencies, the error count and the elapsed seconds.
    """
    payloads = [request_bytes(port, body, content_type) for body, content_type in bodies]
    latencies: list[float] = []
    errors = 0
    counter = iter(range(num_requests))

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index in counter:
            began = time.perf_counter()
            try:
                writer.write(payloads[index % len(payloads)])
                status = await asyncio.wait_for(_read_response(reader), 30)
                errors += status != 200
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            latencies.append(time.perf_counter() - began)
        writer.close()

    async def run_all() -> float:
        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - began

    elapsed = asyncio.run(run_all())
    return latencies, errors, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        help="model file or .onnx export (default: what `cnnkit serve` runs without one, the "
        "bundled symbol model's int8 export where onnxruntime is installed)",
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--source", choices=("upload", "canvas"), default="upload")
    parser.add_argument("--distinct-images", type=int, default=256)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="intra-op threads (0: PyTorch's default)"
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes (cnnkit serve)")
    parser.add_argument("--name", help="record as results/NAME.json (default: serve_load_Nproc)")
    arguments = parser.parse_args()

    model = arguments.model
    from cnnkit.web.server import load_predictor

    predictor = load_predictor(model)  # What the server will run.
    metadata = predictor.metadata
    images = synthetic_images(metadata.kind, arguments.distinct_images)
    bodies = [multipart_body(image, arguments.source) for image in images]
    port = free_port()
    server = start_server(model, port, arguments.torch_threads, arguments.workers)
    try:
        run_clients(port, bodies, arguments.warmup, arguments.concurrency)
        server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
        latencies, errors, elapsed = run_clients(
            port, bodies, arguments.requests, arguments.concurrency
        )
        server_cpu = cpu_seconds(server.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
    finally:
        server.terminate()
        server.wait(timeout=30)

    milliseconds = np.array(latencies) * 1000.0
    figures = {
        "model": f"{metadata.architecture} ({metadata.kind}, {metadata.num_classes} classes)",
        "runtime": predictor.runtime,
        "requests": len(latencies),
        "concurrency": arguments.concurrency,
        "server_processes": arguments.workers,
        "cpu_count": os.cpu_count(),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 2),
        "p90_ms": round(float(np.percentile(milliseconds, 90)), 2),
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 2),
        "max_ms": round(float(milliseconds.max()), 2),
        "mean_ms": round(statistics.fmean(milliseconds), 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "errors": errors,
        "server_cpu_ms_per_request": round(server_cpu * 1000 / len(latencies), 3),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / len(latencies), 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    # What the CPUs could sustain if this benchmark had them to itself: on a shared machine the
    # latencies above depend on the other load, the CPU time per request much less.
    cpu_per_request = figures["server_cpu_ms_per_request"] + figures["client_cpu_ms_per_request"]
    figures["cpu_bound_throughput_rps"] = round(1000.0 * (os.cpu_count() or 1) / cpu_per_request)
    print(json.dumps(figures, indent=2))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import record_result

    record_result(arguments.name or f"serve_load_{arguments.workers}proc", figures)
    passed = (
        figures["p50_ms"] < BARS["p50_ms"]
        and figures["p99_ms"] < BARS["p99_ms"]
        and errors <= BARS["errors"]
    )
    print(
        f"bars (p50 < {BARS['p50_ms']:g} ms, p99 < {BARS['p99_ms']:g} ms, 0 errors): "
        + ("met" if passed else "MISSED")
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
