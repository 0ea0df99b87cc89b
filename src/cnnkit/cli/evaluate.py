"""``cnnkit evaluate`` and ``cnnkit report``: score a model file on a dataset, and write a run's
HTML page.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cnnkit.cli.arguments import CommandError
from cnnkit.cli.model_files import resolve_model_argument, use_recorded_data
from cnnkit.paths import default_cache_dir


def _report_folder(args: argparse.Namespace, model_path: Path) -> Path:
    """Where evaluate writes its report, refused before any work where a file stands in the
    way (the report would otherwise fail only after every image was scored)."""
    from cnnkit.inference.bundled import is_bundled
    from cnnkit.paths import refuse_unusable_folder

    if args.out:
        out, named = Path(args.out), f"--out {args.out}"
    elif args.model and is_bundled(model_path):  # Never into the installed package's folder.
        out = Path("runs") / f"evaluation-{model_path.name}"
        named = str(out)
    elif args.model:
        # A run's model file reports to evaluation/; any other file (an export, an int8 copy,
        # a renamed model) to its own folder, so scoring several files in one folder keeps
        # each report.
        own = model_path.name == "model.safetensors"
        out = model_path.parent / ("evaluation" if own else f"evaluation-{model_path.name}")
        named = str(out)
    else:  # Never into the installed package's folder.
        out = Path("runs") / "evaluation-bundled"
        named = str(out)
    refuse_unusable_folder(out, named, needs="the report")
    return out


def command_evaluate(args: argparse.Namespace) -> int:
    from cnnkit.evaluation.evaluate import evaluate_model_file
    from cnnkit.runtime import tune_allocator
    from cnnkit.training.run_folder import refuse_inside_folder_data

    model_path = resolve_model_argument(args.model)
    if args.dataset is None:
        use_recorded_data(args, model_path)
    tune_allocator()  # As training does: large activations stay mapped (inference_layout.py).
    overrides = {
        "dataset": args.dataset,
        "data": args.data,
        "fold": args.fold,
        "on_bad_image": args.on_bad_image,
        "max_classes": args.max_classes,
        "max_per_class": args.max_per_class,
        "crop_to_bbox": args.crop_to_bbox,
        "test_fraction": args.test_fraction,
    }
    out = _report_folder(args, model_path)
    refuse_inside_folder_data(
        out,
        args.dataset,
        args.data,
        f"{out} is inside the data folder {args.data}: the report's images would become "
        "images of the dataset; write the report elsewhere (--out)",
    )
    report = evaluate_model_file(
        model_path,
        {k: v for k, v in overrides.items() if v is not None},
        out,
        cache_dir=args.cache_dir or default_cache_dir(),
        split=args.split,
        progress=not args.json,
        device=args.device,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    metrics = report.metrics
    # Name the model where no argument did: the bundled one.
    which = "" if args.model else " with the bundled model"
    print(f"Evaluated {metrics['count']} images ({args.split} split){which}")
    for key in ("top1", "top5", "macro_precision", "macro_recall", "macro_f1"):
        print(f"  {key:<16} {metrics[key]:.4f}")
    if report.confused_pairs:
        print("Most confused pairs (true -> predicted: count):")
        for pair in report.confused_pairs[:10]:
            print(f"  {pair['true']} -> {pair['predicted']}: {pair['count']}")
    else:
        print("No image was confused with another class.")
    written = ", ".join(Path(path).name for path in report.files.values())
    print(f"Report: {out} ({written})")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from cnnkit.evaluation.html_report import write_html_report

    if args.out:
        _refuse_non_html_out(Path(args.out))
    print(write_html_report(args.run_dir, args.out))
    return 0


def _refuse_non_html_out(out: Path) -> None:
    """Refuse ``report --out`` naming anything but an HTML file, before a page replaces it:
    ``--out RUN/metrics.csv`` (or the model file) would have been overwritten."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise CommandError(f"--out {out}: the report is an HTML page, so its name ends in .html")
    if out.is_dir():
        raise CommandError(f"--out {out}: a folder; give the HTML file's name")
