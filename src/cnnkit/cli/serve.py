"""``cnnkit serve``: the web page and REST API for a model."""

from __future__ import annotations

import argparse

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.model_files import refuse_an_architecture_name


def command_serve(args: argparse.Namespace) -> int:
    from cnnkit.web.server import serve

    if args.max_upload_mb <= 0:
        raise CommandError(f"--max-upload-mb must be more than 0; got {args.max_upload_mb:g}")
    from cnnkit.runtime import tune_allocator

    tune_allocator()  # And each process of --workers tunes its own (app_from_environment).
    if args.model:
        refuse_an_architecture_name(args.model)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_upload_bytes=round(args.max_upload_mb * 1_000_000),
        allow_remote=args.allow_remote,
        workers=args.workers,
        on_ready=lambda url: print(f"Serving on {url}  (Ctrl-C stops)", flush=True),
        device=args.device,
    )
    return 0
