"""Running the web app: ``serve(...)`` loads the model, checks the address and starts uvicorn
(one process, or several sharing the port), and the helpers it needs for hosts and ports.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import torch
from fastapi import FastAPI
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cnnkit.errors import error_line
from cnnkit.inference.artifact import ModelFileError
from cnnkit.inference.bundled import bundled_int8_path
from cnnkit.inference.predictor import Predictor, open_predictor
from cnnkit.runtime import available_cores, for_inference, select_device, tune_allocator
from cnnkit.web.app import DEFAULT_MAX_UPLOAD_BYTES, create_app, model_summary

logger = logging.getLogger(__name__)


def normalize_host(host: str) -> str:
    """``host`` without surrounding spaces or the brackets of a URL's IPv6 literal: ``[::1]``
    becomes ``::1``, which is what a socket binds to."""
    host = host.strip()
    if len(host) >= 2 and host[0] == "[" and host[-1] == "]":
        return host[1:-1]
    return host


def host_and_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it, with an IPv6 address in brackets (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def page_url(host: str, port: int) -> str:
    """The URL of the page served on ``host`` (a bare address, see :func:`normalize_host`)."""
    return f"http://{host_and_port(host, port)}/"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_predictor(
    model_path: str | None, threads: int | None = None, device: str = "cpu"
) -> Predictor:
    """Load ``model_path`` (a ``.safetensors`` model file, or an ``.onnx`` file from
    ``cnnkit export``, run by onnxruntime with ``threads`` intra-op threads), or the bundled
    symbol model when it is ``None``: on the CPU, its shipped int8 export where onnxruntime is
    installed and loads it (a forward pass 1.5-2.3x as fast), else the model file in PyTorch.
    A PyTorch model runs on ``device`` (``"cpu"``, ``"auto"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).

    Raises:
        FileNotFoundError: if no path is given and the bundled model is missing.
        cnnkit.inference.artifact.ModelFileError: for a bad model file.
        ValueError: for an unknown or unavailable ``device``, or a GPU one for an ``.onnx`` file.
    """
    on_cpu = select_device(device).type == "cpu"
    predictor = _bundled_int8_predictor(threads) if model_path is None and on_cpu else None
    predictor = predictor or open_predictor(model_path, threads=threads, device=device)
    if predictor.model is not None:  # An ONNX predictor has no torch module to optimise.
        optimize_for_serving(predictor.model)
    return predictor


def _bundled_int8_predictor(threads: int | None) -> Predictor | None:
    """The bundled model's int8 export in onnxruntime, or None (with a warning where it is
    there but does not load, such as on an onnxruntime too old for it) for the float one."""
    path = bundled_int8_path()
    if path is None:
        return None
    try:
        return open_predictor(path, threads=threads)
    except (ImportError, ModelFileError) as error:
        logger.warning("serving the float bundled model in PyTorch: %s", error_line(error))
        return None


def free_port(host: str, port: int) -> int:
    """``port`` once checked free on ``host``, or for port 0 the free port the system picks, so
    the address printed is the one served.

    Raises:
        ValueError: when another program already listens on ``host:port`` (uvicorn would only
            log the failure after startup; checking first gives one clear line).
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As uvicorn binds.
        try:
            probe.bind((host, port))
        except OSError as error:
            address = host_and_port(host, port)
            raise ValueError(f"cannot listen on {address} ({error.strerror})") from error
        return probe.getsockname()[1]


def optimize_for_serving(model: torch.nn.Module) -> torch.nn.Module:
    """Fold batch norms into the convolutions before them and use channels-last memory, in place.

    Both leave the eval-mode outputs unchanged up to float rounding and make CPU inference on
    small batches markedly faster (about a third less time for ``symbol_cnn``).
    """
    if model.training:
        raise ValueError("optimize_for_serving needs a model in eval mode")
    for module in model.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        for index in range(len(module) - 1):
            convolution, norm = module[index], module[index + 1]
            if (
                isinstance(convolution, torch.nn.Conv2d)
                and isinstance(norm, torch.nn.BatchNorm2d)
                and norm.track_running_stats
            ):
                module[index] = fuse_conv_bn_eval(convolution, norm)
                module[index + 1] = torch.nn.Identity()
    return for_inference(model)


def _check_serve_settings(
    host: str, port: int, max_upload_bytes: int, allow_remote: bool, workers: int
) -> None:
    """Raise ValueError for a non-loopback ``host`` without ``allow_remote``, or a bad number."""
    if not is_loopback(host) and not allow_remote:
        raise ValueError(
            f"refusing to listen on {host!r}: it is reachable from other machines. Use a loopback "
            "host such as 127.0.0.1, or pass allow_remote=True (cnnkit serve --allow-remote) if "
            "that is intended."
        )
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535; got {port}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes must be >= 1; got {max_upload_bytes}")


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allow_remote: bool = False,
    workers: int = 1,
    on_ready: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> None:
    """Serve the web app and API until interrupted.

    Args:
        model_path: a ``.safetensors`` model file, an ``.onnx`` export, a training run's folder,
            or ``None`` for the bundled symbol model (see :func:`load_predictor`).
        host: the interface to listen on; loopback unless ``allow_remote``. An IPv6 address
            may be given in brackets (``[::1]``).
        port: the TCP port.
        max_upload_bytes: the largest image accepted.
        allow_remote: allow a host other than loopback (exposes the server to the network).
        workers: server processes sharing the port, each with its own copy of the model and
            ``cores // workers`` threads (torch's, or onnxruntime's for an ONNX model). One
            event loop handles about 1,000-1,600 requests/s; with several cores, more
            processes serve more.
        on_ready: called with the page's URL once the model has loaded and the port is free.
        device: where a PyTorch model runs (see :func:`load_predictor`); on a GPU, one process
            serves best (each of several would hold its own copy of the model there).

    Raises:
        ValueError: for a non-loopback ``host`` without ``allow_remote``, or a bad port.
    """
    import uvicorn

    # Once, here: the check, the socket, the URL printed and uvicorn all take the bare address.
    host = normalize_host(host)
    _check_serve_settings(host, port, max_upload_bytes, allow_remote, workers)
    # With several workers, a bad file or device fails here once.
    predictor = load_predictor(model_path, device=device)
    port = free_port(host, port)
    if on_ready is not None:
        on_ready(page_url(host, port))
    if workers > 1:
        settings = {"model": model_path, "max_upload_bytes": max_upload_bytes, "device": device}
        _serve_processes(settings, host, port, workers, predictor)
        return
    app = create_app(predictor, max_upload_bytes)
    logger.info(
        "serving %s (%s, %s) on %s",
        predictor.metadata.architecture,
        predictor.metadata.kind,
        predictor.runtime,
        page_url(host, port),
    )
    # The app bounds the requests in progress (InFlightLimitMiddleware); uvicorn's own limit
    # would count idle connections too. Access logging is off: a log line per prediction is
    # noise and costs CPU.
    uvicorn.run(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="info",
    )


_WORKER_SETTINGS = "CNNKIT_SERVE_SETTINGS"


def _serve_processes(
    settings: dict[str, Any], host: str, port: int, workers: int, predictor: Predictor
) -> None:
    """Run ``workers`` uvicorn processes on one port; each builds its app from ``settings``
    (the model, upload limit and device) and its share of the cores."""
    import json
    import os

    import uvicorn

    summary = model_summary(predictor)
    threads = max(1, available_cores() // workers)
    os.environ[_WORKER_SETTINGS] = json.dumps({**settings, "threads": threads})
    logger.info(
        "serving %s (%s, %s) with %d processes on %s",
        summary["architecture"],
        summary["kind"],
        summary["runtime"],
        workers,
        page_url(host, port),
    )
    uvicorn.run(
        "cnnkit.web.server:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_level="info",
    )


def app_from_environment() -> FastAPI:
    """The app of one server process started by :func:`serve` with several workers."""
    import json
    import os

    settings = json.loads(os.environ[_WORKER_SETTINGS])
    torch.set_num_threads(settings["threads"])
    tune_allocator()
    predictor = load_predictor(
        settings["model"], settings["threads"], settings.get("device", "cpu")
    )
    return create_app(predictor, settings["max_upload_bytes"])
