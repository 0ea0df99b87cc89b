"""HTML building blocks of the run report: cell text, tables, cards and embedded images.

Every piece of text that goes into the page passes through :func:`html.escape` here.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Columns of class names: text even where a name looks like a number (a class "1.50").
NAME_COLUMNS = frozenset({"class_name", "true", "predicted"})


def as_number(value: Any) -> float | None:
    """``value`` as a float (a CSV cell's text included); None for text or NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def format_cell(value: Any, column: str = "") -> str:
    """``value`` as the report shows it: yes/no flags, floats to 4 significant digits."""
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


def escape_cell(value: Any, column: str = "") -> str:
    """:func:`format_cell`, HTML-escaped."""
    return html.escape(format_cell(value, column))


def image_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a base64 data URI."""
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def figure_html(path: Path, alt: str, missing: str | None = None) -> str:
    """The PNG at ``path`` embedded in a ``<figure>``; the ``missing`` note where it is absent."""
    if path.is_file():
        return f"<figure>{image_tag(path.read_bytes(), alt)}</figure>"
    return f'<p class="muted">{html.escape(missing)}</p>' if missing else ""


def _table_cell(row: dict[str, Any], column: str) -> str:
    """One ``<td>``: numbers right-aligned, class names as they are."""
    value = row.get(column)
    numeric = (
        column not in NAME_COLUMNS and as_number(value) is not None and not isinstance(value, bool)
    )
    if numeric and isinstance(value, str) and any(c in value for c in ".eE"):
        value = float(value)  # CSV text such as 0.2937062937 shows as 0.2937.
    css = ' class="num"' if numeric else ""
    return f"<td{css}>{escape_cell(value, column)}</td>"


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A table of ``rows`` (``columns``, else the first row's keys); pruned trials greyed."""
    if not rows:
        return '<p class="muted">(empty)</p>'
    columns = list(columns or rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = "".join(_table_cell(row, column) for column in columns)
        css = ' class="pruned"' if str(row.get("pruned", "")).lower() in ("true", "yes") else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def cards_html(items: Iterable[tuple[str, Any]]) -> str:
    """A row of headline figures, one card per ``(label, value)``; None values are left out."""
    cards = [
        f'<div class="card"><span class="muted">{html.escape(label)}</span>'
        f"<b>{escape_cell(value)}</b></div>"
        for label, value in items
        if value is not None
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def pre_html(text: str | None) -> str:
    """``text`` as a preformatted block; nothing for no text."""
    return f"<pre>{html.escape(text)}</pre>" if text else ""
