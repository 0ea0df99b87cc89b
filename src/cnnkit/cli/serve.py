"""``cnnkit serve``: the web page and REST API for a model."""

from __future__ import annotations

import argparse
import math

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.model_files import refuse_what_is_no_model


def upload_limit_bytes(megabytes: float) -> int:
    """``--max-upload-mb`` in bytes: a finite number of MB, at least one byte.

    Raises:
        CommandError: for 0 or less, less than a byte, infinity or NaN.
    """
    if not math.isfinite(megabytes) or megabytes <= 0:
        raise CommandError(f"--max-upload-mb must be a number above 0; got {megabytes:g}")
    limit = round(megabytes * 1_000_000)
    if limit < 1:
        raise CommandError(
            f"--max-upload-mb {megabytes:g} is less than one byte (0.000001 MB is one byte)"
        )
    return limit


def command_serve(args: argparse.Namespace) -> int:
    from cnnkit.web.server import serve

    max_upload_bytes = upload_limit_bytes(args.max_upload_mb)
    from cnnkit.runtime import tune_allocator

    tune_allocator()  # And each process of --workers tunes its own (app_from_environment).
    if args.model:
        refuse_what_is_no_model(args.model)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_upload_bytes=max_upload_bytes,
        allow_remote=args.allow_remote,
        workers=args.workers,
        on_ready=lambda url: print(f"Serving on {url}  (Ctrl-C stops)", flush=True),
        device=args.device,
    )
    return 0
