"""The named search spaces (``book``, ``book-wide``, ``symbol``), and a space by name or file.

A space file's format is described in :mod:`cnnkit.search.space_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.search.space import SearchParameter, SearchSpace
from cnnkit.search.space_files import load_space


def _categorical(name: str, target: str, choices: list[Any]) -> SearchParameter:
    return SearchParameter(name, "categorical", target, choices=tuple(choices))


# The book's grid search (step 15): 2 x 5 x 4 = 40 book_cnn models on the book-hasy preset.
BOOK_SPACE = SearchSpace(
    "book",
    (
        _categorical("convs", "model.options.convs", [1, 2]),
        _categorical("dense", "model.options.dense", [128, 256, 512, 1024, 2048]),
        _categorical("dropout", "model.options.dropout", [0.0, 0.25, 0.5, 0.75]),
    ),
    preset="book-hasy-search",
)

# The book's parameters plus the optimiser's, for TPE or random search.
BOOK_WIDE_SPACE = SearchSpace(
    "book-wide",
    (
        *BOOK_SPACE.parameters,
        SearchParameter("learning_rate", "float", "train.learning_rate", 1e-4, 1e-2, log=True),
        _categorical("batch_size", "train.batch_size", [32, 64, 128]),
    ),
    preset="book-hasy",
)

# Our symbol network: width, depth, regularisation and learning rate.
SYMBOL_SPACE = SearchSpace(
    "symbol",
    (
        _categorical("width", "model.options.width", [16, 32, 48, 64]),
        SearchParameter("layers_per_stage", "int", "model.options.layers_per_stage", 1, 3),
        SearchParameter("dropout", "float", "model.options.dropout", 0.0, 0.5),
        SearchParameter("learning_rate", "float", "train.learning_rate", 3e-4, 1e-2, log=True),
        SearchParameter("weight_decay", "float", "train.weight_decay", 1e-5, 1e-2, log=True),
        SearchParameter("label_smoothing", "float", "train.label_smoothing", 0.0, 0.2),
    ),
    preset=None,
)

SPACES = {space.name: space for space in (BOOK_SPACE, BOOK_WIDE_SPACE, SYMBOL_SPACE)}


def resolve_space(name_or_path: str) -> SearchSpace:
    """A named space (``book``, ``book-wide``, ``symbol``) or a YAML file.

    Raises:
        ValueError: if it is neither a known name nor a readable file.
    """
    if name_or_path in SPACES:
        return SPACES[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        return load_space(path)
    raise ValueError(
        f"unknown search space {name_or_path!r}; use one of {', '.join(SPACES)} or a YAML file"
    )
