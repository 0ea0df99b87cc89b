"""One self-contained HTML page for a run folder (a training run or a search).

Images are embedded as base64 PNGs and the CSS is inline, so the page opens offline and can be
mailed as one file. Every piece of text from the run folder is HTML-escaped.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

from cnnkit.atomic import write_atomically
from cnnkit.evaluation.html_run_sections import training_sections
from cnnkit.evaluation.html_search_sections import search_sections
from cnnkit.paths import RUN_INFO, is_search_folder

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
    sections = search_sections(run_dir) if is_search else training_sections(run_dir)
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
