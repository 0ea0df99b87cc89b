"""The HTML report's sections for a hyperparameter search: headline cards, the trials table,
the search's figures, the best trial and its retraining, and the search settings.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from cnnkit.evaluation.html_fragments import (
    as_number,
    cards_html,
    escape_cell,
    figure_html,
    pre_html,
    table_html,
)
from cnnkit.evaluation.run_files import (
    as_mapping,
    read_csv_rows,
    read_mapping,
    read_text,
    retrained_from,
)
from cnnkit.paths import RUN_INFO, SEARCH_SETTINGS


def _search_cards(
    settings: dict[str, Any], rows: list[dict[str, str]], finished: list[dict[str, str]]
) -> str:
    """Sampler, pruner, trial counts and the best trial's accuracy, one card each."""
    best = finished[0] if finished else None
    search = settings.get("search")
    search = search if isinstance(search, dict) else {}
    return cards_html(
        [
            ("sampler", search.get("sampler")),
            ("pruner", search.get("pruner")),
            ("trials", len(rows)),
            ("finished", len(finished)),
            ("pruned", sum(row.get("state") == "pruned" for row in rows)),
            ("best val accuracy", as_number(best.get("val_accuracy")) if best else None),
            ("its test top-1", as_number(best.get("test_top1")) if best else None),
        ]
    )


def _best_line(run_dir: Path, settings: dict[str, Any], best: dict[str, str]) -> str:
    """The best trial's number and its searched parameters' values."""
    space = as_mapping(settings.get("space"), f"{run_dir / SEARCH_SETTINGS}: space")
    parameters = as_mapping(space.get("parameters"), f"{run_dir / SEARCH_SETTINGS}: parameters")
    chosen = ", ".join(f"{name}={best.get(name)}" for name in parameters)
    return f"<p>Best: trial {escape_cell(best.get('trial'))} ({html.escape(chosen)})</p>"


def _trial_sections(run_dir: Path, rows: list[dict[str, str]]) -> list[str]:
    """The trials table and the figures the search wrote beside ``results.csv``."""
    columns = [c for c in (rows[0] if rows else []) if c != "run_dir"]
    return [
        "<h2>Trials (sorted by validation accuracy)</h2>",
        f'<div class="scroll">{table_html(rows, columns)}</div>',
        "<h2>Learning curves of every trial</h2>",
        figure_html(run_dir / "learning_curves.png", "learning curves", "no trial reported yet"),
        "<h2>Accuracy against each hyperparameter</h2>",
        figure_html(
            run_dir / "accuracy_by_parameter.png", "accuracy by parameter", "no trials yet"
        ),
        "<h2>Parameter importances</h2>",
        figure_html(
            run_dir / "param_importances.png",
            "parameter importances",
            "importances need at least two finished trials",
        ),
    ]


def _best_trial_sections(run_dir: Path, best: dict[str, str] | None) -> list[str]:
    """The best trial's confusion matrix, and the test result of its retraining, if any."""
    sections = []
    if best and best.get("run_dir"):
        confusion = run_dir / best["run_dir"] / "report" / "confusion.png"
        if confusion.is_file():
            sections += [
                "<h2>Best trial: confusion matrix</h2>",
                figure_html(confusion, "confusion"),
            ]
    retrained = read_mapping(run_dir / "best" / RUN_INFO)
    if retrained:
        test = as_mapping(retrained.get("test"), f"{run_dir / 'best' / RUN_INFO}: test")
        sections += [
            "<h2>Best configuration retrained on train+validation</h2>",
            cards_html(
                [("test top-1", as_number(test.get("top1"))), ("status", retrained.get("status"))]
            ),
            f'<p class="muted">{escape_cell(retrained.get("data", ""))}</p>',
        ]
        trial = run_dir / best["run_dir"] if best and best.get("run_dir") else None
        if trial is not None and retrained_from(run_dir / "best", trial) is False:
            sections.append(
                f"<p><strong>best/ holds an earlier best trial's retraining</strong>: trial "
                f"{escape_cell(best.get('trial', ''))} is the best now (<code>cnnkit search ... "
                "--retrain-best</code> with the same --out retrains it).</p>"
            )
    return sections


def search_sections(run_dir: Path) -> list[str]:
    """The report's sections for the search in ``run_dir``, in page order."""
    settings_text = read_text(run_dir / SEARCH_SETTINGS)
    settings = read_mapping(run_dir / SEARCH_SETTINGS, settings_text or "")
    rows = read_csv_rows(run_dir / "results.csv")
    finished = [row for row in rows if row.get("state") == "complete"]
    best = finished[0] if finished else None
    sections = [_search_cards(settings, rows, finished)]
    if best:
        sections.append(_best_line(run_dir, settings, best))
    sections += _trial_sections(run_dir, rows)
    sections += _best_trial_sections(run_dir, best)
    sections += ["<h2>Search settings</h2>", pre_html(settings_text)]
    return sections
