"""One self-contained HTML page for a run folder (a training run or a search).

Images are embedded as base64 PNGs and the CSS is inline, so the page opens offline and can be
mailed as one file. Every piece of text from the run folder is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from cnnkit.atomic import write_atomically
from cnnkit.evaluation.plots import plt
from cnnkit.paths import RUN_INFO, SEARCH_SETTINGS, is_search_folder, member_folders

REPORT_NAME = "report.html"
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;
background:#f4f5f8}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #ccd;
padding-bottom:4px}
.muted{color:#667}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left}th{background:#eef0f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.pruned td{color:#889}
img{max-width:100%;height:auto;background:#fff;border:1px solid #dde}
pre{background:#fff;border:1px solid #dde;padding:10px;overflow:auto;font-size:12px}
.scroll{max-height:520px;overflow:auto}
"""

logger = logging.getLogger(__name__)


def _unreadable(path: Path, error: Exception) -> None:
    """A file that is there but cannot be read: say so, as its section is left out."""
    if path.exists():
        logger.warning("%s: cannot be read (%s); the report leaves it out", path, error)


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, ValueError, csv.Error) as error:
        _unreadable(path, error)
        return []
    # DictReader puts the fields past the header's under the key None, which no column shows.
    extra = [number for number, row in enumerate(rows, start=2) if None in row]
    if extra:
        logger.warning(
            "%s: line %d has more fields than the header; the report leaves them out",
            path,
            extra[0],
        )
    return [{key: value for key, value in row.items() if key is not None} for row in rows]


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """``value`` when it is a mapping, else {} with a warning: a well-formed file may still
    hold a list where a section of settings belongs, and its section is then left out."""
    if isinstance(value, dict):
        return value
    if value is not None:
        logger.warning("%s is not a mapping; the report leaves it out", where)
    return {}


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        _unreadable(path, error)
        return None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _format(value: Any, column: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if column == "pruned" and value in ("True", "False"):  # A flag read back from a CSV.
        return "yes" if value == "True" else "no"
    if isinstance(value, float) and (column == "seconds" or abs(value) >= 100):
        return f"{value:.1f}"
    if isinstance(value, float):
        # Significant digits: a learning rate of 2.6e-05 would be 0.0000 to four places,
        # and a phase 1.0 shows as 1.
        return f"{value:.4g}"
    return str(value)


def _escape(value: Any, column: str = "") -> str:
    return html.escape(_format(value, column))


def image_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _figure(path: Path, alt: str, missing: str | None = None) -> str:
    if path.is_file():
        return f"<figure>{image_tag(path.read_bytes(), alt)}</figure>"
    return f'<p class="muted">{html.escape(missing)}</p>' if missing else ""


# Columns of class names: text even where a name looks like a number (a class "1.50").
NAME_COLUMNS = frozenset({"class_name", "true", "predicted"})


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(empty)</p>'
    columns = list(columns or rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            numeric = (
                column not in NAME_COLUMNS
                and _number(value) is not None
                and not isinstance(value, bool)
            )
            if numeric and isinstance(value, str) and any(c in value for c in ".eE"):
                value = float(value)  # CSV text such as 0.2937062937 shows as 0.2937.
            css = ' class="num"' if numeric else ""
            cells.append(f"<td{css}>{_escape(value, column)}</td>")
        css = ' class="pruned"' if str(row.get("pruned", "")).lower() in ("true", "yes") else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cards(items: Iterable[tuple[str, Any]]) -> str:
    cards = [
        f'<div class="card"><span class="muted">{html.escape(label)}</span>'
        f"<b>{_escape(value)}</b></div>"
        for label, value in items
        if value is not None
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _pre(text: str | None) -> str:
    return f"<pre>{html.escape(text)}</pre>" if text else ""


def learning_curves_png(rows: Sequence[dict[str, str]]) -> bytes | None:
    """Accuracy and loss per epoch (train and validation) from ``metrics.csv`` rows."""
    epochs = [_number(row.get("epoch")) for row in rows]
    if not rows or any(epoch is None for epoch in epochs):
        return None
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, metric in zip(axes, ("accuracy", "loss"), strict=True):
        for split, style in (("train", "--"), ("val", "-")):
            values = [_number(row.get(f"{split}_{metric}")) for row in rows]
            if any(v is not None for v in values):
                axis.plot(epochs, values, style, marker="o", markersize=3, label=split)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _read_mapping(path: Path, text: str | None = None) -> dict[str, Any]:
    """A JSON file (``.json``) or YAML file (a run's ``config.yaml``, a search's settings) as a
    mapping, from ``text`` when it was read already; {} when it is absent, and {} with a
    warning when it is unreadable or not a mapping."""
    import yaml

    text = _read_text(path) if text is None else text
    if not text:
        return {}
    try:
        mapping = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        _unreadable(path, error)
        return {}
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        _unreadable(path, ValueError("not a mapping"))
        return {}
    return mapping


def _phase_history(run_dir: Path) -> list[dict[str, str]]:
    """An unfinished transfer run's epochs so far, from its phase folders (``frozen``,
    ``finetune``, then an ensemble's ``finetune-2``...), tagged and numbered on as the finished
    run's ``metrics.csv`` has them (phase 1 frozen, 2 the first fine-tune, k + 1 the k-th)."""
    members = {folder.name: int(folder.name[9:]) + 1 for folder in member_folders(run_dir)}
    tags = {"frozen": 1, "finetune": 2, **members}
    history: list[dict[str, str]] = []
    for folder, tag in tags.items():
        offset = len(history)
        for row in _read_csv(run_dir / folder / "metrics.csv"):
            epoch = _number(row.get("epoch"))
            numbered = "" if epoch is None or not math.isfinite(epoch) else str(offset + int(epoch))
            history.append({**row, "epoch": numbered, "phase": str(float(tag))})
    return history


def _training_sections(run_dir: Path) -> list[str]:
    info = _read_mapping(run_dir / RUN_INFO)
    report_dir = run_dir / "report"
    where = run_dir / RUN_INFO
    test = _read_mapping(report_dir / "metrics.json") or _mapping(
        info.get("test"), f"{where}: test"
    )
    fit = _mapping(info.get("fit"), f"{where}: fit")
    config = _mapping(info.get("config"), f"{where}: config") or _read_mapping(
        run_dir / "config.yaml"
    )
    model = _mapping(config.get("model"), "the run's config: model")
    data = _mapping(config.get("data"), "the run's config: data")
    # A transfer run writes its combined metrics.csv at the end; until then, its phases'.
    history = _read_csv(run_dir / "metrics.csv") or _phase_history(run_dir)
    transfer = any("phase" in row for row in history) or (run_dir / "phases.json").exists()
    # A transfer run's epochs are the head's and the fine-tune's: no single plan to compare.
    train = _mapping(config.get("train"), "the run's config: train")
    planned = None if transfer else train.get("epochs")
    # Without a validation split the trainer keeps the best training accuracy: label it so.
    validated = any(row.get("val_accuracy") not in (None, "") for row in history)
    best_label = "best val accuracy" if validated else "best train accuracy (no val split)"
    best = fit.get("best_val_accuracy")
    if best is None and history:  # An interrupted run has no fit summary yet.
        column = "val_accuracy" if validated else "train_accuracy"
        best = max((_number(row.get(column)) or 0.0 for row in history), default=None)
    trained_on_test = bool(data.get("train_on_all"))
    test_label = "test top-1 (trained on these images)" if trained_on_test else "test top-1"
    epochs = fit.get("epochs_run", len(history) if history else None)
    sections = [
        _cards(
            [
                ("status", info.get("status")),
                (test_label, _number(test.get("top1"))),
                ("test top-5", _number(test.get("top5"))),
                (best_label, _number(best)),
                ("epochs", f"{epochs} of {planned}" if epochs is not None and planned else epochs),
                ("model", model.get("name")),
            ]
        ),
        f'<p class="muted">{_escape(info.get("data", ""))}</p>',
    ]
    if info.get("status") in ("interrupted", "running", "failed"):
        failure = f" It failed: {_escape(info.get('error'))}." if info.get("error") else ""
        sections.append(
            f'<p class="muted">Not finished: {len(history)} epoch(s) recorded.{failure} '
            "<code>cnnkit train ... --resume</code> with the same settings continues from the "
            "last checkpoint; the test report below appears when the run ends.</p>"
        )
    if trained_on_test:
        sections.append(
            '<p class="muted">Trained with --train-on-all: the test images were also training '
            "images, so the test figures overstate accuracy on new images.</p>"
        )
    png = learning_curves_png(history)
    sections.append("<h2>Learning curves</h2>")
    sections.append(image_tag(png, "learning curves") if png else '<p class="muted">none</p>')
    if history:
        sections.append(f"<details><summary>Per-epoch metrics</summary>{_table(history)}</details>")
    scalars = {k: v for k, v in test.items() if isinstance(v, (int, float))}
    if scalars:
        sections += ["<h2>Test metrics</h2>", _table([scalars])]
    if report_dir.is_dir():  # Written when the run ends; no empty placeholders before that.
        confusion = _figure(report_dir / "confusion.png", "confusion matrix", "no confusion matrix")
        sections += ["<h2>Confusion matrix</h2>", confusion]
        pairs = [row for row in _read_csv(report_dir / "confused_pairs.csv") if row.get("true")]
        sections += ["<h2>Most-confused pairs</h2>", _table(pairs[:20])]
        sections += [
            "<h2>Misclassified examples</h2>",
            _figure(report_dir / "misclassified.png", "misclassified test images", "none saved"),
        ]
        per_class = _read_csv(report_dir / "per_class.csv")
        if per_class:
            worst = sorted(per_class, key=lambda row: _number(row.get("f1")) or 0.0)[:15]
            sections += ["<h2>Weakest classes (F1)</h2>", _table(worst)]
    sections += ["<h2>Configuration</h2>", _pre(_read_text(run_dir / "config.yaml"))]
    details = {k: v for k, v in info.items() if k != "config"}
    sections.append(_pre(json.dumps(details, indent=2, default=str)) if details else "")
    return sections


def _search_sections(run_dir: Path) -> list[str]:
    settings_text = _read_text(run_dir / SEARCH_SETTINGS)
    settings = _read_mapping(run_dir / SEARCH_SETTINGS, settings_text or "")
    search = settings.get("search")
    search = search if isinstance(search, dict) else {}
    rows = _read_csv(run_dir / "results.csv")
    finished = [row for row in rows if row.get("state") == "complete"]
    best = finished[0] if finished else None
    sections = [
        _cards(
            [
                ("sampler", search.get("sampler")),
                ("pruner", search.get("pruner")),
                ("trials", len(rows)),
                ("finished", len(finished)),
                ("pruned", sum(row.get("state") == "pruned" for row in rows)),
                ("best val accuracy", _number(best.get("val_accuracy")) if best else None),
                ("its test top-1", _number(best.get("test_top1")) if best else None),
            ]
        )
    ]
    if best:
        space = _mapping(settings.get("space"), f"{run_dir / SEARCH_SETTINGS}: space")
        parameters = _mapping(space.get("parameters"), f"{run_dir / SEARCH_SETTINGS}: parameters")
        chosen = ", ".join(f"{name}={best.get(name)}" for name in parameters)
        sections.append(f"<p>Best: trial {_escape(best.get('trial'))} ({html.escape(chosen)})</p>")
    columns = [c for c in (rows[0] if rows else []) if c != "run_dir"]
    sections += ["<h2>Trials (sorted by validation accuracy)</h2>"]
    sections.append(f'<div class="scroll">{_table(rows, columns)}</div>')
    sections += [
        "<h2>Learning curves of every trial</h2>",
        _figure(run_dir / "learning_curves.png", "learning curves", "no trial reported yet"),
        "<h2>Accuracy against each hyperparameter</h2>",
        _figure(run_dir / "accuracy_by_parameter.png", "accuracy by parameter", "no trials yet"),
        "<h2>Parameter importances</h2>",
        _figure(
            run_dir / "param_importances.png",
            "parameter importances",
            "importances need at least two finished trials",
        ),
    ]
    if best and best.get("run_dir"):
        confusion = run_dir / best["run_dir"] / "report" / "confusion.png"
        if confusion.is_file():
            sections += ["<h2>Best trial: confusion matrix</h2>", _figure(confusion, "confusion")]
    retrained = _read_mapping(run_dir / "best" / RUN_INFO)
    if retrained:
        test = _mapping(retrained.get("test"), f"{run_dir / 'best' / RUN_INFO}: test")
        sections += [
            "<h2>Best configuration retrained on train+validation</h2>",
            _cards(
                [("test top-1", _number(test.get("top1"))), ("status", retrained.get("status"))]
            ),
            f'<p class="muted">{_escape(retrained.get("data", ""))}</p>',
        ]
    sections += ["<h2>Search settings</h2>", _pre(settings_text)]
    return sections


def build_report_html(run_dir: str | Path) -> str:
    """The HTML page for ``run_dir`` (a search folder or a training run folder).

    Raises:
        ValueError: if the folder holds neither.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ValueError(f"{run_dir} is a file: pass the run or search folder ({run_dir.parent})")
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such folder")
    is_search = is_search_folder(run_dir) or (run_dir / "results.csv").is_file()
    markers = (RUN_INFO, "config.yaml", "metrics.csv")
    if not is_search and not any((run_dir / name).is_file() for name in markers):
        raise ValueError(f"{run_dir}: not a cnnkit run or search folder (no run.json)")
    kind = "Hyperparameter search" if is_search else "Training run"
    sections = _search_sections(run_dir) if is_search else _training_sections(run_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{kind}: {run_dir.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="muted">{html.escape(str(run_dir))} - generated {stamp}</p>'
        + "\n".join(sections)
        + "</main></body></html>\n"
    )


def write_html_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Render ``run_dir`` into ``RUN_DIR/report.html`` (or ``path``), written atomically."""
    page = build_report_html(run_dir)
    target = Path(path) if path else Path(run_dir) / REPORT_NAME
    # A path that is not UTF-8 (the run's data folder) shows its odd bytes as \udcXX escapes.
    page_bytes = page.encode("utf-8", "backslashreplace")
    write_atomically(target, lambda temporary: temporary.write_bytes(page_bytes))
    return target
