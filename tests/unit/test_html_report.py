"""Tests for cnnkit.evaluation.html_report: self-contained pages for runs and searches."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from cnnkit.config import build_run_config
from cnnkit.evaluation.html_report import REPORT_NAME, build_report_html, write_html_report
from cnnkit.evaluation.search_plots import write_search_figures
from cnnkit.evaluation.search_table import TrialSummary, write_results_tables
from cnnkit.presets import preset_for
from cnnkit.training.run import train_run

IMAGE = re.compile(r'<img alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}">')


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert all(source.startswith("data:image/png;base64,") for source in sources)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = build_run_config(
        preset_for("digits"),
        {
            "data": {"dataset": "digits"},
            "model": {"options": {"width": 8}},
            "train": {"epochs": 2, "max_steps_per_epoch": 3},
            "out": str(out),
        },
    )
    train_run(config, progress=False)
    return out


def test_training_run_report_is_self_contained(tiny_run):
    path = write_html_report(tiny_run)
    assert path == tiny_run / REPORT_NAME
    page = path.read_text(encoding="utf-8")
    for section in (
        "Training run",
        "Learning curves",
        "Test metrics",
        "Confusion matrix",
        "Most-confused pairs",
        "Misclassified examples",
        "Configuration",
    ):
        assert f">{section}" in page, section
    # Learning curves, confusion matrix and misclassified grid.
    assert len(IMAGE.findall(page)) >= 3
    assert "symbol_cnn" in page
    assert_self_contained(page)
    assert not list(tiny_run.glob(".report.html.*"))  # No temporary file left behind.

    # The figures are the run's own: run.json's test metrics, to 4 significant digits.
    test = json.loads((tiny_run / "run.json").read_text(encoding="utf-8"))["test"]
    cards = re.findall(r'<span class="muted">([^<]*)</span><b>([^<]*)</b>', page)
    assert ("test top-1", f"{test['top1']:.4g}") in cards
    assert ("test top-5", f"{test['top5']:.4g}") in cards
    table = re.search(r">Test metrics</h2>\s*<table>(.*?)</table>", page, re.S)
    assert table, "no Test metrics table"
    head = re.findall(r"<th>([^<]*)</th>", table.group(1))
    row = re.findall(r"<td[^>]*>([^<]*)</td>", table.group(1))
    shown = dict(zip(head, row, strict=True))
    assert shown["top1"] == f"{test['top1']:.4g}" and shown["top5"] == f"{test['top5']:.4g}"
    assert shown["count"] == str(test["count"])


def test_text_from_the_run_folder_is_escaped(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {name: '<script>alert(1)</script>'}\n")
    (tmp_path / "metrics.csv").write_text("epoch,train_accuracy\n1,0.5\n2,0.7\n")
    report = tmp_path / "report"
    report.mkdir()
    (report / "confused_pairs.csv").write_text(
        'true,predicted,count\n"<b>x</b>",\\&amp;,3\n', encoding="utf-8"
    )
    page = build_report_html(tmp_path)
    assert "<script>" not in page and "<b>x</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "\\&amp;amp;" in page
    assert_self_contained(page)


def test_search_report_has_table_and_plots(tmp_path):
    trials = [
        TrialSummary(
            0,
            "complete",
            {"dense": 128, "dropout": 0.5},
            0.81,
            0.7,
            0.8,
            3,
            12.0,
            "trials/trial-000",
            [(1, 0.6), (2, 0.75), (3, 0.81)],
        ),
        TrialSummary(
            1,
            "pruned",
            {"dense": 256, "dropout": 0.0},
            0.4,
            1.9,
            None,
            1,
            3.0,
            "trials/trial-001",
            [(1, 0.4)],
        ),
        TrialSummary(
            2,
            "complete",
            {"dense": 512, "dropout": 0.25},
            0.78,
            0.8,
            0.77,
            3,
            15.0,
            "trials/trial-002",
            [(1, 0.55), (2, 0.7), (3, 0.78)],
        ),
    ]
    names = ["dense", "dropout"]
    write_results_tables(trials, names, tmp_path)
    write_search_figures(trials, names, {"dense": 0.7, "dropout": 0.3}, tmp_path)
    (tmp_path / "search.yaml").write_text(
        "search: {sampler: grid, pruner: halving}\nspace: {parameters: {dense: {}, dropout: {}}}\n"
    )
    page = write_html_report(tmp_path).read_text(encoding="utf-8")
    for section in (
        "Hyperparameter search",
        "Trials (sorted by validation accuracy)",
        "Learning curves of every trial",
        "Accuracy against each hyperparameter",
        "Parameter importances",
        "Search settings",
    ):
        assert section in page, section
    assert len(IMAGE.findall(page)) == 3
    assert "Best: trial 0 (dense=128, dropout=0.5)" in page
    assert page.index('<td class="num">0</td>') < page.index('<td class="num">2</td>')
    assert "<td>yes</td>" in page and "<td>True</td>" not in page  # The pruned column.
    assert_self_contained(page)
    # best/ retrained trial 0 (its config.yaml: the trial's, but for out and the validation
    # share); a continued search whose best is another trial says best/ is an earlier one's.
    config = (
        "data: {{dataset: digits, val_fraction: {share}}}\n"
        "model: {{options: {{dense: {dense}}}}}\nout: {out}\n"
    )
    for number, dense in ((0, 128), (2, 512)):
        trial = tmp_path / f"trials/trial-00{number}"
        trial.mkdir(parents=True)
        (trial / "config.yaml").write_text(config.format(share=0.1, dense=dense, out=trial))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.yaml").write_text(config.format(share=0.0, dense=128, out="b"))
    (tmp_path / "best" / "run.json").write_text('{"status": "finished", "test": {"top1": 0.8}}')
    page = write_html_report(tmp_path).read_text(encoding="utf-8")
    assert "Best configuration retrained on train+validation" in page
    assert "an earlier best trial" not in page
    trials[2] = dataclasses.replace(trials[2], val_accuracy=0.9)  # Trial 2 is now the best.
    write_results_tables(trials, names, tmp_path)
    page = write_html_report(tmp_path).read_text(encoding="utf-8")
    assert "best/ holds an earlier best trial's retraining</strong>: trial 2 is the best" in page


def test_importances_missing_is_explained(tmp_path):
    trial = TrialSummary(0, "complete", {"dense": 128}, 0.8, 0.7, 0.8, 1, 1.0, "", [(1, 0.8)])
    write_results_tables([trial], ["dense"], tmp_path)
    write_search_figures([trial], ["dense"], None, tmp_path)
    page = build_report_html(tmp_path)
    assert "importances need at least two finished trials" in page


def test_other_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a cnnkit run"):
        build_report_html(tmp_path)
    with pytest.raises(ValueError, match="missing: no such folder"):
        build_report_html(tmp_path / "missing")


def test_a_corrupt_file_in_the_run_folder_is_named(tmp_path, caplog):
    (tmp_path / "config.yaml").write_text("model: {name: symbol_cnn}\n", encoding="utf-8")
    (tmp_path / "run.json").write_text("{cut off", encoding="utf-8")
    (tmp_path / "metrics.csv").write_bytes(b"epoch,train_accuracy\n1,\xff\n")
    page = build_report_html(tmp_path)
    assert "symbol_cnn" in page  # What could be read is still reported.
    warned = [record.getMessage() for record in caplog.records]
    assert any("run.json: cannot be read" in message for message in warned), warned
    assert any("metrics.csv: cannot be read" in message for message in warned), warned
    (tmp_path / "run.json").write_text("[1, 2]", encoding="utf-8")  # JSON, but a list.
    assert "symbol_cnn" in build_report_html(tmp_path)
    assert "run.json: cannot be read (not a mapping)" in caplog.text


def test_a_search_yaml_that_is_not_a_mapping_is_named(tmp_path, caplog):
    (tmp_path / "search.yaml").write_text("garbage text\n", encoding="utf-8")
    (tmp_path / "results.csv").write_text("number,state\n", encoding="utf-8")
    assert "Hyperparameter search" in build_report_html(tmp_path)
    assert "search.yaml: cannot be read (not a mapping)" in caplog.text


def test_report_cells_show_seconds_to_a_tenth_and_other_floats_to_four_digits() -> None:
    from cnnkit.evaluation.html_fragments import format_cell as _format

    assert _format(9.5, "seconds") == "9.5" and _format(9.5) == "9.5"
    assert _format(0.0314159, "seconds") == "0.0" and _format(0.96504) == "0.965"
    assert _format(2.6e-05) == "2.6e-05" and _format(1.0) == "1"
    assert _format(123.456) == "123.5" and _format(True) == "yes" and _format(None) == ""


def test_class_names_that_look_like_numbers_are_shown_as_they_are() -> None:
    from cnnkit.evaluation.html_fragments import table_html as _table

    rows = [{"true": "1.50", "predicted": "2e3", "count": "4", "f1": "0.2937062937"}]
    page = _table(rows)
    assert "<td>1.50</td><td>2e3</td>" in page  # Names, as the CSV holds them.
    assert '<td class="num">4</td><td class="num">0.2937</td>' in page


def test_search_help_names_its_defaults(capsys) -> None:
    from cnnkit.cli import main

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: book)" in text and "(default: tpe)" in text
    assert "successive halving (default)" in text


def test_a_run_without_validation_that_trained_on_the_test_images_says_so(tmp_path):
    config = build_run_config(
        preset_for("digits"),
        {
            "data": {"dataset": "digits", "val_fraction": 0.0, "train_on_all": True},
            "model": {"options": {"width": 8}},
            "train": {"epochs": 1, "max_steps_per_epoch": 2},
            "out": str(tmp_path / "run"),
        },
    )
    train_run(config, progress=False)
    page = build_report_html(tmp_path / "run")
    assert "best val accuracy" not in page
    assert "best train accuracy (no val split)" in page
    assert "test top-1 (trained on these images)" in page
    assert "overstate accuracy on new images" in page


def test_an_interrupted_run_shows_its_progress_and_how_to_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # The run.json of an interrupted run has no config: the report reads config.yaml.
    (run / "run.json").write_text('{"status": "interrupted", "data": "digits"}')
    (run / "config.yaml").write_text("train: {epochs: 8}\nmodel: {name: symbol_cnn}\n")
    (run / "metrics.csv").write_text(
        "epoch,train_loss,train_accuracy,val_accuracy\n1,1.2,0.6,0.931\n2,0.8,0.8,0.965\n",
        encoding="utf-8",
    )
    page = build_report_html(run)
    assert_self_contained(page)
    cards = re.findall(r'<span class="muted">([^<]*)</span><b>([^<]*)</b>', page)
    assert ("epochs", "2 of 8") in cards and ("best val accuracy", "0.965") in cards
    assert ("status", "interrupted") in cards and ("model", "symbol_cnn") in cards
    assert "--resume" in page
    # The test report is written when a run ends: no empty placeholders before that.
    assert "Confusion matrix" not in page and "Misclassified examples" not in page
    # A search's interrupted trial keeps no checkpoint: the search runs its settings again.
    trial = tmp_path / "search" / "trials" / "trial-001"
    trial.parent.mkdir(parents=True)
    run.rename(trial)
    (tmp_path / "search" / "search.yaml").write_text("search: {sampler: tpe}\n")
    page = build_report_html(trial)
    assert "--resume" not in page
    assert "Continuing the search (<code>cnnkit search ...</code> with the same --out) runs" in page


def test_an_interrupted_ensemble_run_shows_every_phase_so_far(tmp_path):
    run = tmp_path / "run"
    header = "epoch,train_loss,train_accuracy\n"
    phases = {"frozen": 3, "finetune": 2, "finetune-2": 1}  # Stopped in the second member.
    for folder, epochs in phases.items():
        (run / folder).mkdir(parents=True)
        rows = "".join(f"{epoch},0.5,0.{epoch}\n" for epoch in range(1, epochs + 1))
        (run / folder / "metrics.csv").write_text(header + rows, encoding="utf-8")
    (run / "run.json").write_text('{"status": "interrupted", "data": "birds"}')
    (run / "config.yaml").write_text("model: {name: efficientnet_lite0, options: {members: 2}}\n")
    page = build_report_html(run)
    assert "Not finished: 6 epoch(s) recorded" in page
    cards = re.findall(r'<span class="muted">([^<]*)</span><b>([^<]*)</b>', page)
    assert ("epochs", "6") in cards
    table = page.split("Per-epoch metrics")[1]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table)
    # Epochs numbered on across the phases, each row tagged with its phase.
    assert [cells[i : i + 4] for i in range(0, 24, 4)] == [
        ["1", "0.5", "0.1", "1"],
        ["2", "0.5", "0.2", "1"],
        ["3", "0.5", "0.3", "1"],
        ["4", "0.5", "0.1", "2"],
        ["5", "0.5", "0.2", "2"],
        ["6", "0.5", "0.1", "3"],
    ]


def test_a_phase_row_with_an_odd_epoch_keeps_the_report(tmp_path):
    run = tmp_path / "run"
    (run / "finetune").mkdir(parents=True)
    rows = "epoch,train_accuracy\n1,0.5\ninf,0.6\n,0.7\n3,0.8\n"
    (run / "finetune" / "metrics.csv").write_text(rows, encoding="utf-8")
    (run / "run.json").write_text('{"status": "running", "data": "birds"}')
    page = build_report_html(run)
    assert "Not finished: 4 epoch(s) recorded" in page
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page.split("Per-epoch metrics")[1])
    assert [cells[i] for i in range(0, 12, 3)] == ["1", "", "", "3"]


def test_small_hyperparameters_keep_their_significant_digits(tmp_path):
    (tmp_path / "results.csv").write_text(
        "trial,state,learning_rate,weight_decay,val_accuracy\n"
        "0,complete,2.6e-05,1.1e-05,0.9312345\n",
        encoding="utf-8",
    )
    page = build_report_html(tmp_path)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", page.split("Trials (sorted")[1])
    assert cells == ["0", "complete", "2.6e-05", "1.1e-05", "0.9312"]


def test_well_formed_files_of_unexpected_shapes_are_named_and_left_out(tmp_path, caplog):
    """A run.json config that is a list, a search.yaml space that is a list, and a metrics.csv
    row with an extra field each leave their section out with a warning, not a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"config": [1, 2], "fit": "x", "test": 3}', encoding="utf-8")
    (run / "metrics.csv").write_text("epoch,train_accuracy\n1,0.5,extra\n", encoding="utf-8")
    assert "Training run" in build_report_html(run)
    assert "run.json: config is not a mapping" in caplog.text
    assert "metrics.csv: line 2 has more fields than the header" in caplog.text
    search = tmp_path / "search"
    search.mkdir()
    (search / "search.yaml").write_text("space: [dense, dropout]\n", encoding="utf-8")
    (search / "results.csv").write_text("trial,state,dense\n0,complete,8\n", encoding="utf-8")
    assert "Hyperparameter search" in build_report_html(search)
    assert "search.yaml: space is not a mapping" in caplog.text


def test_a_file_passed_for_the_run_folder_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {name: symbol_cnn}\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        build_report_html(tmp_path / "config.yaml")
    assert str(error.value) == (
        f"{tmp_path / 'config.yaml'} is a file: pass the run or search folder ({tmp_path})"
    )


def test_a_results_table_of_the_earlier_format_is_still_shown(tmp_path):
    """Searches written before the epochs column was named epochs_run still report."""
    (tmp_path / "search.yaml").write_text("space: {parameters: {dense: {}}}\n", encoding="utf-8")
    (tmp_path / "results.csv").write_text(
        "trial,state,dense,val_accuracy,val_loss,test_top1,epochs,seconds,pruned,run_dir\n"
        "0,complete,8,0.5,1.0,,3,2.0,False,trials/trial-000\n",
        encoding="utf-8",
    )
    page = build_report_html(tmp_path)
    assert "Best: trial 0 (dense=8)" in page and "<th>epochs</th>" in page
