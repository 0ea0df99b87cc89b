"""Render a LaTeX symbol to SVG on the server with matplotlib's mathtext (no network, no TeX).

Mathtext knows most of the commands in HASYv2 but not all (``\\male``, ``\\fullmoon``, ...); for
those the LaTeX source itself is drawn as plain text, so a label always renders.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from functools import lru_cache
from xml.sax.saxutils import escape

from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.mathtext import MathTextParser

logger = logging.getLogger(__name__)

MAX_LATEX_LENGTH = 200
FONT_SIZE = 32
_MARGIN_POINTS = 2.0

# Mathtext's parser and font caches are shared module state; one lock keeps renders serial.
_RENDER_LOCK = threading.Lock()
_PARSER = MathTextParser("path")
_BARE_DOLLAR = re.compile(r"(?<!\\)\$")

# HASYv2 commands from LaTeX packages that mathtext lacks, drawn with an equivalent it knows.
_SUBSTITUTES = {
    r"\&": r"\mathrm{&}",
    r"\pounds": "£",
    r"\mathsection": "§",
    r"\parr": "⅋",
    r"\with": "&",
    r"\fint": "⨏",
    r"\varoiint": "∯",
    r"\varsubsetneq": "⊊",
    r"\shortrightarrow": "→",
    r"\lightning": "↯",
    r"\llbracket": "⟦",
    r"\rrbracket": "⟧",
    r"\dotsc": r"\ldots",
    r"\sqrt{}": r"\sqrt{\ }",
    r"\square": "□",
    r"\lozenge": "◊",
    r"\iddots": "⋰",
    r"\mathds{1}": "𝟙",
    r"\celsius": "℃",
    r"\ohm": "Ω",
    r"\venus": "♀",
    r"\female": "♀",
    r"\mars": "♂",
    r"\male": "♂",
    r"\astrosun": "☉",
    r"\sun": "☼",
    r"\fullmoon": "○",
    r"\leftmoon": "☾",
    r"\checked": "✓",
    r"\diameter": "⌀",
    r"\Bowtie": "⋈",
}


def _figure_to_svg(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # Glyphs are written as paths so the browser needs no font; no date keeps the output stable.
    figure.savefig(buffer, format="svg", transparent=True, metadata={"Date": None})
    return buffer.getvalue()


def _render_text(text: str, parse_math: bool) -> bytes:
    properties = FontProperties(size=FONT_SIZE)
    if parse_math:
        width, height, depth, _, _ = _PARSER.parse(text, dpi=72, prop=properties)
    else:
        # Estimate the box of plain text without a renderer: about 0.6 em per character.
        width, height, depth = (
            0.6 * FONT_SIZE * max(len(text), 1),
            1.2 * FONT_SIZE,
            0.25 * FONT_SIZE,
        )
    width, height = width + 2 * _MARGIN_POINTS, height + 2 * _MARGIN_POINTS
    figure = Figure(figsize=(width / 72.0, height / 72.0))
    figure.text(
        _MARGIN_POINTS / width,
        (depth + _MARGIN_POINTS) / height,
        text,
        fontproperties=properties,
        parse_math=parse_math,
    )
    return _figure_to_svg(figure)


def _fallback_svg(text: str) -> bytes:
    """A hand-written SVG of the escaped text; cannot fail."""
    width = 12 + 18 * max(len(text), 1)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="44" '
        f'viewBox="0 0 {width} 44"><text x="6" y="30" font-family="monospace" font-size="28">'
        f"{escape(text)}</text></svg>"
    ).encode()


@lru_cache(maxsize=2048)
def render_latex_svg(latex: str) -> bytes:
    """SVG bytes showing ``latex`` as a maths symbol, or as plain text if mathtext cannot parse it.

    Args:
        latex: a LaTeX command or character such as ``\\alpha`` (without dollar signs).

    Returns:
        A complete SVG document.

    Raises:
        ValueError: if ``latex`` is empty or longer than :data:`MAX_LATEX_LENGTH`.
    """
    latex = latex.strip()
    if not latex:
        raise ValueError("latex must not be empty")
    if len(latex) > MAX_LATEX_LENGTH:
        raise ValueError(f"latex must be at most {MAX_LATEX_LENGTH} characters")
    with _RENDER_LOCK:
        # A bare dollar sign would end the maths early; an escaped one (``\$``) is a symbol.
        if not _BARE_DOLLAR.search(latex):
            maths = _SUBSTITUTES.get(latex, latex)
            if maths.startswith(r"\mathds{"):
                maths = r"\mathbb{" + maths[len(r"\mathds{") :]
            try:
                return _render_text(f"${maths}$", parse_math=True)
            except Exception as error:  # Mathtext raises ValueError and others for unknown input.
                logger.debug("mathtext cannot render %r (%s); drawing it as text", latex, error)
        try:
            return _render_text(latex, parse_math=False)
        except Exception:
            logger.warning("cannot render %r as text; using a plain SVG", latex, exc_info=True)
    return _fallback_svg(latex)
