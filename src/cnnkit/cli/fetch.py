"""``cnnkit fetch``: download or import a dataset archive."""

from __future__ import annotations

import argparse
import shlex

from cnnkit.cli.arguments import CommandError


def command_fetch(args: argparse.Namespace) -> int:
    from cnnkit.data.fetch import fetch_archive
    from cnnkit.data.official_archives import compute_checksum

    if args.from_file and args.url:
        raise CommandError("--from imports a local copy and --url downloads one: give either")
    try:
        path = fetch_archive(
            args.name,
            args.to,
            from_file=args.from_file,
            url=args.url,
            verify=not args.no_verify,
            progress=True,
            sha256=args.sha256,
        )
    except FileNotFoundError as error:
        raise CommandError(str(error)) from error
    print(f"Archive ready: {path}")
    # The publishers give only an MD5; this lets the next fetch check with --sha256.
    checked = "" if not args.no_verify else " (of the file as it is: not verified)"
    print(f"SHA-256: {compute_checksum(path, 'sha256')}{checked}")
    fold = " --fold 1" if args.name == "hasy" else ""  # The paper's protocol; its figures.
    print(f"Next: cnnkit train --dataset {args.name} --data {shlex.quote(str(path))}{fold}")
    return 0
