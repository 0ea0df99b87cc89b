"""Tests for cnnkit.search.driver and spaces: grid, pruning, resume, kill and retrain-best."""

from __future__ import annotations

import csv
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from tests.conftest import subprocess_env

import cnnkit
from cnnkit.config import build_run_config, config_to_dict
from cnnkit.data.sources import build_splits
from cnnkit.presets import preset_for
from cnnkit.search.budget import nothing_left_to_run, trials_to_run
from cnnkit.search.config import SearchConfig
from cnnkit.search.driver import run_search
from cnnkit.search.results import TrialReporter, parameter_importances
from cnnkit.search.space import SearchParameter, SearchSpace
from cnnkit.search.space_checks import check_parameter_values
from cnnkit.search.space_files import load_space, parse_space
from cnnkit.search.spaces import BOOK_SPACE, resolve_space
from cnnkit.search.study import build_pruner, open_study
from cnnkit.search.trial_config import build_trial_config, overrides_for
from cnnkit.search.trials import PruningCallback, suggest_params
from cnnkit.search.workers import (
    ORPHAN_SECONDS,
    CoreShare,
    default_workers,
    worker_identity,
)
from cnnkit.training.preprocessing import resolve_preprocessing
from cnnkit.training.run import train_run

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Four tiny book_cnn models: quick to train on the digits.
TINY_SPACE = SearchSpace(
    "tiny",
    (
        SearchParameter("convs", "categorical", "model.options.convs", choices=(1, 2)),
        SearchParameter("dense", "categorical", "model.options.dense", choices=(8, 16)),
    ),
    preset="book-hasy",
)


WIDE_DENSE = SearchParameter(
    "dense", "categorical", "model.options.dense", choices=(8, 16, 24, 32, 40, 48)
)


def tiny_base(out: Path, epochs: int = 2, **train: object):
    return build_run_config(
        preset_for("book-hasy"),
        {
            "data": {"dataset": "digits"},
            "train": {"epochs": epochs, "max_steps_per_epoch": 3, **train},
            "out": str(out),
        },
    )


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    config = tiny_base(tmp_path_factory.mktemp("unused"))
    return build_splits(config.data, resolve_preprocessing(config))


def finished_params(study: optuna.Study) -> list[tuple]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [tuple(sorted(t.params.items())) for t in study.get_trials(states=states)]


def load_study(run_dir: Path, name: str | None = None) -> optuna.Study:
    storage = f"sqlite:///{run_dir / 'study.db'}"
    return optuna.load_study(study_name=name or run_dir.name, storage=storage)


def read_events(log_dir: Path) -> tuple[dict, dict, dict]:
    """What TensorBoard reads from LOG_DIR's event files: the HParams entry's values and
    discrete domains, and the scalars (tag -> [(step, value)])."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    def plain(value):
        return getattr(value, value.WhichOneof("kind"))

    events = EventAccumulator(str(log_dir))
    events.Reload()
    try:
        content = events.PluginTagToContent("hparams")
    except KeyError:  # No HParams entry at all.
        content = {}
    values, domains = {}, {}
    for data in content.values():
        entry = plugin_data_pb2.HParamsPluginData.FromString(data)
        for name, value in entry.session_start_info.hparams.items():
            values[name] = plain(value)
        for info in entry.experiment.hparam_infos:
            domains[info.name] = [plain(value) for value in info.domain_discrete.values]
    scalars = {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
    return values, domains, scalars


# ----------------------------------------------------------------------------- spaces


def test_book_space_is_the_books_40_model_grid():
    expected = set(itertools.product([1, 2], [128, 256, 512, 1024, 2048], [0.0, 0.25, 0.5, 0.75]))
    combos = BOOK_SPACE.grid_combinations()
    assert len(combos) == 40
    assert {(c["convs"], c["dense"], c["dropout"]) for c in combos} == expected
    assert BOOK_SPACE.preset == "book-hasy-search"
    assert resolve_space("book") is BOOK_SPACE


def test_grid_sampler_visits_each_book_combination_once():
    study = optuna.create_study(
        sampler=optuna.samplers.GridSampler(BOOK_SPACE.grid(), seed=0), direction="maximize"
    )
    study.optimize(lambda trial: len(suggest_params(trial, BOOK_SPACE, grid=True)), n_trials=60)
    params = finished_params(study)
    assert len(params) == 40  # The sampler stops the study once the grid is exhausted.
    assert len(set(params)) == 40


def test_trial_config_applies_targets(tmp_path):
    space = SearchSpace(
        "mixed",
        (
            SearchParameter("dense", "categorical", "model.options.dense", choices=(64,)),
            SearchParameter("learning_rate", "float", "train.learning_rate", 1e-4, 1e-2),
        ),
    )
    params = {"dense": 64, "learning_rate": 0.005}
    assert overrides_for(space, params) == {
        "model": {"options": {"dense": 64}},
        "train": {"learning_rate": 0.005},
    }
    config = build_trial_config(tiny_base(tmp_path), space, params, tmp_path / "t")
    assert config.model.name == "book_cnn"
    assert config.model.options["dense"] == 64
    assert config.train.learning_rate == 0.005
    assert config.train.optimizer == "adam"  # The preset's other settings stay.
    assert config.run_dir() == tmp_path / "t"


def test_a_trial_of_another_model_keeps_only_the_base_options_it_takes(tmp_path):
    """The base's options were set for its own model (and book_cnn's image_size by the
    training command): a symbol_cnn trial of a space searching model.name would fail on them."""
    space = SearchSpace(
        "models",
        (
            SearchParameter(
                "model", "categorical", "model.name", choices=("book_cnn", "symbol_cnn")
            ),
        ),
    )
    book = replace_options(tiny_base(tmp_path), {"image_size": 8, "dense": 16})
    symbol = build_trial_config(book, space, {"model": "symbol_cnn"}, tmp_path / "a")
    assert symbol.model.name == "symbol_cnn" and symbol.model.options == {}
    same = build_trial_config(book, space, {"model": "book_cnn"}, tmp_path / "b")
    assert same.model.options == {"image_size": 8, "dense": 16}
    # The other way: book_cnn is sized by the data's input size, as training sizes it.
    base = replace_options(tiny_base(tmp_path), {"width": 8})
    base = replace(base, model=replace(base.model, name="symbol_cnn"))
    book = build_trial_config(base, space, {"model": "book_cnn"}, tmp_path / "c")
    assert book.model.options == {"image_size": base.data.image_size}


def test_a_trial_of_another_backbone_takes_photos_at_its_own_size(tmp_path):
    """From a trio at 320 px, a Lite0 or Lite2 trial trains at its weights' 224 or 260 px (the
    base's size is the trio's), and the data settings follow; a drawn size is kept."""
    lites = ("efficientnet_lite0", "efficientnet_lite2")
    space = SearchSpace(
        "lites", (SearchParameter("model", "categorical", "model.name", choices=lites),)
    )
    base = build_run_config(
        preset_for("cub"),
        {"data": {"dataset": "folder", "data": str(tmp_path)}},
        {"out": str(tmp_path / "s")},
    )
    assert base.model.options["image_size"] == 320
    for name, size in zip(lites, (224, 260), strict=True):
        trial = build_trial_config(base, space, {"model": name}, tmp_path / name)
        assert "image_size" not in trial.model.options
        assert (trial.data.image_size, trial.data.stored_size) == (size, size + 32)
    sized = SearchSpace(
        "sized",
        (
            *space.parameters,
            SearchParameter("size", "categorical", "model.options.image_size", choices=(288,)),
        ),
    )
    trial = build_trial_config(base, sized, {"model": lites[0], "size": 288}, tmp_path / "t")
    assert trial.model.options["image_size"] == 288
    assert (trial.data.image_size, trial.data.stored_size) == (288, 320)


def test_a_search_names_a_test_share_its_data_does_not_use(tmp_path, capsys):
    """A search reports its data as training does: a --test-fraction next to data that
    brings its own test split (here train/ and test/ folders) is named as unused."""
    from tests.conftest import write_bird_folder

    from cnnkit.cli.search import _report_data
    from cnnkit.config import Preprocessing

    for split in ("train", "test"):
        write_bird_folder(tmp_path / "data" / split, per_class=2)
    layers = [{"data": {"dataset": "folder", "data": str(tmp_path / "data")}}]
    for fraction, noted in ((0.3, True), (None, False)):
        share = {"data": {"test_fraction": fraction}} if fraction else {}
        base = build_run_config(preset_for("hasy"), *layers, share)
        _report_data(build_splits(base.data, Preprocessing()), base)
        said = capsys.readouterr().out
        assert ("so test_fraction 0.3 (--test-fraction) is not used" in said) == noted, said


def replace_options(config, options: dict):
    return replace(config, model=replace(config.model, options=options))


def test_space_file_format(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "preset: book-hasy\n"
        "parameters:\n"
        "  dense: {type: categorical, choices: [128, 256], target: model.options.dense}\n"
        "  learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "  convs: {type: int, low: 1, high: 2}\n",
        encoding="utf-8",
    )
    space = load_space(path)
    assert space.name == "space" and space.preset == "book-hasy"
    by_name = {p.name: p for p in space.parameters}
    assert by_name["learning_rate"].target == "train.learning_rate"
    assert by_name["convs"].target == "model.options.convs"
    assert by_name["convs"].grid_values() == [1, 2]
    dropout = SearchParameter("dropout", "float", "model.options.dropout", 0.1, 0.5, step=0.1)
    assert dropout.grid_values() == [0.1, 0.2, 0.3, 0.4, 0.5]  # Not 0.30000000000000004.
    with pytest.raises(ValueError, match="grid search needs finite values"):
        space.grid()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: {type: bogus}", "type must be one of"),
        ("a: {type: float, low: 1}", "need 'low' and 'high'"),
        ("a: {type: categorical, choices: [1], target: train.nope}", "no field 'nope'"),
        ("a: {type: categorical, choices: [1], wat: 2}", "unknown key"),
        ("a: {type: float, low: abc, high: 1}", "'a': low must be a number; got 'abc'"),
        ("a: {choices: 5}", "'a': choices must be a list such as"),
        ("a: {type: float, low: [1", "invalid YAML \\(line 1, column 25"),
        ("a: {type: int, low: 16, high: 64, step: 0}", "'a': step must be > 0; got 0"),
        ("a: {type: int, low: 16, high: 64, step: -16}", "'a': step must be > 0; got -16"),
        ("a: {type: int, low: 16, high: 18, step: 0.5}", "'a': int parameters need a whole step"),
        ("a: {type: int, low: 0.5, high: 2}", "'a': int parameters need a whole low"),
        ("m: {type: int, low: 1, high: 2, target: model.name}", "'m': model.name is chosen"),
        (
            "dropout: {type: float, low: 0.1, high: 0.5, log: 'no'}",
            "bad.yaml: search parameter 'dropout': log must be true or false; got 'no'",
        ),
        ("a: {low: 0.1, high: 0.5, log: 'false'}", "log must be true or false; got 'false'"),
        (
            "preset: [digits]\nparameters: {a: {choices: [1]}}",
            "bad.yaml: search space 'bad': preset must be a preset name such as book-hasy; "
            "got \\['digits'\\]",
        ),
    ],
)
def test_space_file_errors_name_the_parameter(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_space(path)


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("pruner", ["median", "halving"])
def test_pruner_stops_a_bad_trial(pruner):
    config = SearchConfig(pruner=pruner, prune_warmup=1, median_startup_trials=2)
    study = optuna.create_study(direction="maximize", pruner=build_pruner(config))

    def objective(trial: optuna.Trial) -> float:
        quality = trial.suggest_float("quality", 0.0, 1.0)
        for epoch in range(1, 10):
            trial.report(quality * epoch / 10, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return quality

    for quality in (0.9, 0.8, 0.85):
        study.enqueue_trial({"quality": quality})
    study.enqueue_trial({"quality": 0.01})
    study.optimize(objective, n_trials=4)
    last = study.trials[-1]
    assert last.state == optuna.trial.TrialState.PRUNED
    assert max(last.intermediate_values) == 1


def test_pruning_callback_stops_train_run(tmp_path, digits_data):
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )
    study.add_trial(
        optuna.trial.create_trial(value=0.99, intermediate_values={1: 0.99, 2: 0.99, 3: 0.99})
    )
    trial = study.ask()
    # A learning rate this small leaves the model at chance level.
    config = build_run_config(
        config_to_dict(tiny_base(tmp_path / "bad", epochs=3)), {"train": {"learning_rate": 1e-9}}
    )
    callback = PruningCallback(trial)
    with pytest.raises(optuna.TrialPruned):
        train_run(config, progress=False, callbacks=[callback], data=digits_data)
    assert trial.should_prune()
    lines = (tmp_path / "bad" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2  # Stopped after the first epoch.
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- studies


def test_search_resumes_without_repeating_trials(tmp_path, digits_data, caplog):
    base = tiny_base(tmp_path / "search")
    config = SearchConfig(sampler="grid", pruner="none", n_trials=2, sampler_seed=1)
    first = run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    assert first.counts["complete"] == 2
    second = run_search(
        base,
        TINY_SPACE,
        SearchConfig(sampler="grid", pruner="none"),
        progress=False,
        data=digits_data,
    )
    params = finished_params(load_study(base.run_dir()))
    assert len(params) == 4 and len(set(params)) == 4
    assert second.counts["complete"] == 4
    assert f"continuing study {second.study_name}, which holds 2 finished trial(s)" in caplog.text
    # A third run finds nothing left to do, and says why.
    third = run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    assert len(finished_params(load_study(base.run_dir()))) == 4
    assert third.best is not None
    assert (
        "the search already holds 4 finished trials and --n-trials is 2: nothing left to run "
        "(a larger --n-trials runs more)"
    ) in caplog.text
    caplog.clear()
    everything = SearchConfig(sampler="grid", pruner="none")
    run_search(base, TINY_SPACE, everything, progress=False, data=digits_data)
    assert "every point of the grid has been tried (4 finished trials)" in caplog.text

    run_dir = base.run_dir()
    assert sorted(p.name for p in (run_dir / "trials").iterdir()) == [
        f"trial-{n:03d}" for n in range(4)
    ]
    for trial in (run_dir / "trials").iterdir():
        with open(trial / "metrics.csv", encoding="utf-8") as handle:
            epochs = list(csv.DictReader(handle))
        assert [int(epoch["epoch"]) for epoch in epochs] == [1, 2]
        # Each trial's own TensorBoard log holds its epochs' metrics.
        scalars = read_events(trial / "tensorboard")[2]
        assert {"train_loss", "val_loss", "val_accuracy"} <= set(scalars)
        assert scalars["val_accuracy"] == [
            (int(epoch["epoch"]), pytest.approx(float(epoch["val_accuracy"]), rel=1e-6))
            for epoch in epochs
        ]
        assert not (trial / "checkpoint.pt").exists()
    assert len(list((run_dir / "tensorboard").glob("trial-*/events.out.tfevents.*"))) == 4
    with open(run_dir / "results.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # One HParams entry a trial: its parameters, state and results.
    for row in rows:
        values, domains, scalars = read_events(
            run_dir / "tensorboard" / f"trial-{int(row['trial']):03d}"
        )
        assert values == {
            "convs": int(row["convs"]),
            "dense": int(row["dense"]),
            "state": "complete",
        }
        assert domains == {"convs": [1, 2], "dense": [8, 16], "state": ["complete", "pruned"]}
        for name in ("val_accuracy", "val_loss", "test_top1"):
            assert scalars[f"hparams/{name}"] == [(0, pytest.approx(float(row[name]), rel=1e-6))]
        assert scalars["hparams/epochs_run"] == [(0, 2.0)]
    accuracies = [float(row["val_accuracy"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {"convs", "dense", "val_loss", "epochs_run", "seconds", "pruned"} <= set(rows[0])
    assert (run_dir / "results.md").read_text().startswith("| rank | trial |")
    for name in ("learning_curves.png", "accuracy_by_parameter.png", "param_importances.png"):
        assert (run_dir / name).stat().st_size > 1000


def test_a_seeded_search_continued_tries_new_points(tmp_path, digits_data):
    """A continued study's sampler does not start its seed's sequence again: with continuous
    ranges, a repeated point can only be a sequence started over. (TPE seeds its random
    start-up trials the same way, through sampler_seed.)"""
    sampler = "random"
    space = SearchSpace(
        "continuous",
        (
            SearchParameter("dropout", "float", "model.options.dropout", 0.0, 0.5),
            SearchParameter("learning_rate", "float", "train.learning_rate", 1e-4, 1e-2, log=True),
        ),
    )
    base = tiny_base(tmp_path / "search", epochs=1)
    for n_trials in (2, 4):
        config = SearchConfig(sampler=sampler, pruner="none", n_trials=n_trials, sampler_seed=1)
        run_search(base, space, config, progress=False, data=digits_data)
    study = load_study(base.run_dir())
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 4 and len(set(params)) == 4
    # A new study with the same seed still repeats the first run's points.
    again = tiny_base(tmp_path / "again", epochs=1)
    config = SearchConfig(sampler=sampler, pruner="none", n_trials=2, sampler_seed=1)
    run_search(again, space, config, progress=False, data=digits_data)
    assert [tuple(sorted(t.params.items())) for t in load_study(again.run_dir()).trials] == (
        params[:2]
    )


def test_continuing_a_search_with_other_settings_is_refused(tmp_path, digits_data):
    base = tiny_base(tmp_path / "search", epochs=1)
    config = SearchConfig(sampler="grid", pruner="none", n_trials=1)
    run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    settings = (base.run_dir() / "search.yaml").read_text(encoding="utf-8")
    other_sampler = SearchConfig(sampler="random", pruner="none", n_trials=2)
    with pytest.raises(ValueError, match="holds a search with another sampler; continue it"):
        run_search(base, TINY_SPACE, other_sampler, progress=False, data=digits_data)
    longer = tiny_base(tmp_path / "search", epochs=2)
    with pytest.raises(ValueError, match=r"another base config \(train\.epochs\); continue"):
        run_search(longer, TINY_SPACE, config, progress=False, data=digits_data)
    # A second study in the folder would write its trial-000 over the first's.
    renamed = replace(config, study_name="another")
    with pytest.raises(ValueError, match="another study name; continue"):
        run_search(base, TINY_SPACE, renamed, progress=False, data=digits_data)
    # Nothing was recorded: the settings file and the study are as the first run left them.
    assert (base.run_dir() / "search.yaml").read_text(encoding="utf-8") == settings
    assert len(load_study(base.run_dir()).trials) == 1
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "run.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="holds a training run, not a search"):
        run_search(tiny_base(trained), TINY_SPACE, config, progress=False, data=digits_data)
    # The same settings with a larger budget continue it, also from a folder spelled another
    # way, on another device, or moved: where it runs is not what it compares.
    more = SearchConfig(sampler="grid", pruner="none", n_trials=2)
    elsewhere = tiny_base(tmp_path / "search" / ".." / "search", epochs=1, device="cpu")
    assert (
        run_search(elsewhere, TINY_SPACE, more, progress=False, data=digits_data).counts["complete"]
        == 2
    )
    (tmp_path / "search").rename(tmp_path / "moved")
    moved = tiny_base(tmp_path / "moved", epochs=1)
    most = SearchConfig(sampler="grid", pruner="none", n_trials=3)
    assert (
        run_search(moved, TINY_SPACE, most, progress=False, data=digits_data).counts["complete"]
        == 3
    )
    assert len(set(finished_params(load_study(tmp_path / "moved", "search")))) == 3


def test_a_model_option_no_model_takes_is_refused_before_anything_runs(tmp_path, digits_data):
    space = parse_space({"widht": {"type": "categorical", "choices": [8, 16]}}, "typo")
    base = tiny_base(tmp_path / "search")
    optuna.logging.set_verbosity(optuna.logging.INFO)
    with pytest.raises(
        ValueError, match="'widht' sets model option 'widht', which book_cnn does not take"
    ):
        run_search(base, space, SearchConfig(sampler="grid"), progress=False, data=digits_data)
    # Optuna's own INFO lines, which would repeat each trial line, are off (not under -v).
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"dense": {"choices": ["abc"]}}, "'abc' for model.options.dense is not a valid setting"),
        ({"learning_rate": {"low": -1.0, "high": 0.1}}, "-1.0 for train.learning_rate"),
    ],
)
def test_a_value_the_run_settings_refuse_is_refused_before_any_trial(
    tmp_path, digits_data, spec, message
):
    base = tiny_base(tmp_path / "search")
    with pytest.raises(ValueError, match=message):
        run_search(base, parse_space(spec, "bad"), SearchConfig(), progress=False, data=digits_data)
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize(
    ("target", "choices"),
    [
        ("data.train_on_all", [True]),
        ("data.val_fraction", [0.0]),
        ("data.test_fraction", [0.1, 0.3]),
        ("data.seed", [1, 2]),
        ("data.max_per_class", [20]),
        ("data.max_classes", [5]),
        ("data.on_bad_image", ["skip"]),
        ("data.dataset", ["digits"]),
    ],
)
def test_a_space_that_changes_the_images_trials_are_compared_on_is_refused(
    tmp_path, digits_data, target, choices
):
    """Trials that trained on the test images, ranked on training accuracy or on other splits
    would be compared on different images: such a space is refused before anything is made."""
    path = tmp_path / "space.yaml"
    path.write_text(f"x: {{choices: {choices}, target: {target}}}\n", encoding="utf-8")
    base = tiny_base(tmp_path / "search", epochs=1)
    config = SearchConfig(sampler="grid", pruner="none", n_trials=1)
    message = (
        f"{path}: parameter 'x' targets {target}, which changes the images trials are compared on; "
    )
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        run_search(
            base, load_space(path), config, progress=False, data=digits_data, space_file=path
        )
    assert "\n" not in str(error.value)
    assert not (tmp_path / "search").exists()


def test_preprocessing_settings_may_be_searched(tmp_path):
    """Image size and channels change how the same images are read, not which they are."""
    from cnnkit.search.space_checks import check_data_targets

    space = parse_space(
        {
            "size": {"choices": [16, 32], "target": "data.image_size"},
            "channels": {"choices": [1, 3], "target": "data.channels"},
        },
        "sizes",
    )
    check_data_targets(space)  # No error.
    base = tiny_base(tmp_path / "search")
    assert (base.data.image_size, base.data.channels) == (32, 3)
    trial = build_trial_config(base, space, {"size": 16, "channels": 1}, tmp_path / "t")
    assert (trial.data.image_size, trial.data.channels) == (16, 1)
    assert trial.data.dataset == base.data.dataset == "digits"  # The same images.
    # The images are read as the trial says: one channel, normalised over one channel.
    trial = build_trial_config(base, space, {"size": 32, "channels": 1}, tmp_path / "t")
    preprocessing = resolve_preprocessing(trial)
    assert (preprocessing.image_size, preprocessing.channels) == (32, 1)
    assert len(preprocessing.mean) == len(preprocessing.std) == 1


def test_cli_search_refuses_a_space_that_trains_on_the_test_images(tmp_path, capsys) -> None:
    from cnnkit.cli import main

    path = tmp_path / "space.yaml"
    path.write_text("everything: {choices: [true], target: data.train_on_all}\n", encoding="utf-8")
    out = tmp_path / "search"
    args = ["search", "--dataset", "digits", "--space", str(path), "--out", str(out)]
    tiny = ["--epochs", "1", "--max-steps-per-epoch", "2", "--n-trials", "1", "--workers", "1"]
    assert main([*args, *tiny]) == 2
    err = capsys.readouterr().err
    assert "parameter 'everything' targets data.train_on_all" in err
    assert not out.exists()
    # A model option the model does not take: the message names the file too.
    path.write_text("drop: {choices: [0.1], target: model.options.no_such}\n", encoding="utf-8")
    assert main([*args, *tiny]) == 2
    assert f"{path}: search parameter 'drop' sets model option 'no_such'" in capsys.readouterr().err


def test_a_grid_search_of_a_continuous_range_leaves_no_study(tmp_path, digits_data):
    space = SearchSpace(
        "continuous", (SearchParameter("dropout", "float", "model.options.dropout", 0.0, 0.5),)
    )
    base = tiny_base(tmp_path / "search", epochs=1)
    config = SearchConfig(sampler="grid", pruner="none")
    with pytest.raises(ValueError, match="grid search needs finite values") as error:
        run_search(base, space, config, progress=False, data=digits_data)
    assert not (tmp_path / "search" / "study.db").exists()
    assert not (tmp_path / "search").exists()
    assert str(error.value) == (
        "search space 'continuous': grid search needs finite values: give 'dropout' choices "
        "or a step"
    )


def test_a_grid_search_of_a_built_in_continuous_space_says_what_can_be_done(capsys) -> None:
    """A built-in space cannot be given choices: the advice is another sampler or a file."""
    from cnnkit.cli import main

    for space, named in (("symbol", "'dropout', 'learning_rate'"), ("book-wide", "'learning")):
        assert main(["search", "--dataset", "digits", "--space", space, "--sampler", "grid"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"cnnkit search: error: search space '{space}': grid search needs finite values, "
            f"and its {named}"
        )
        assert "use --sampler tpe or random, or a YAML space that lists their values" in err
        assert "give" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("widht: {choices: [8, 16]}", "search parameter 'widht' sets model option 'widht'"),
        ("dense: {choices: [abc]}", "search parameter 'dense': 'abc' for model.options.dense"),
        ("members: {choices: [1, 2]}", "search trains one model a trial, not ensembles"),
    ],
)
def test_errors_of_the_model_checks_name_the_space_file(tmp_path, digits_data, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    base = tiny_base(tmp_path / "search")
    config = SearchConfig(sampler="grid")
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        run_search(
            base, load_space(path), config, progress=False, data=digits_data, space_file=path
        )
    # Without the file: the space's name.
    with pytest.raises(ValueError, match=re.escape(f"search space 'space': {message}")):
        run_search(base, load_space(path), config, progress=False, data=digits_data)
    assert not (tmp_path / "search").exists()


def test_option_values_are_checked_against_the_models_the_space_names(tmp_path):
    """``dense`` is book_cnn's option, not symbol_cnn's: valid when the space trains both."""
    base = build_run_config(preset_for("digits"), {"out": str(tmp_path / "search")})
    assert base.model.name == "symbol_cnn"
    models = {"type": "categorical", "choices": ["book_cnn"], "target": "model.name"}
    space = parse_space({"model": models, "dense": {"choices": [16, 32]}}, "two")
    check_parameter_values(space, base)  # No error.
    bad = parse_space({"model": models, "dense": {"choices": ["wide"]}}, "bad")
    with pytest.raises(ValueError, match="'wide' for model.options.dense"):
        check_parameter_values(bad, base)


def test_two_parameters_setting_one_target_are_refused():
    """Which of the two a trial trained with would depend on the order of the file."""
    spec = {
        "model": {"choices": ["book_cnn"], "target": "model.name"},
        "network": {"choices": ["symbol_cnn"], "target": "model.name"},
    }
    with pytest.raises(ValueError, match="'model' and 'network' both set model.name; keep one"):
        parse_space(spec, "twice")


def test_each_worker_gets_its_own_sampler_seed(tmp_path, monkeypatch):
    from cnnkit.search import pool as search_pool

    seen = []
    monkeypatch.setattr(search_pool, "die_with_parent", lambda: None)

    def open_study(config, space, run_dir, held=0):
        seen.append((config.sampler_seed, held))
        return None, "", ""

    monkeypatch.setattr(search_pool, "open_study", open_study)
    monkeypatch.setattr(search_pool, "optimize_study", lambda *args: None)
    base = tiny_base(tmp_path / "search")
    for index in (1, 2):
        search_pool.worker_main(base, TINY_SPACE, SearchConfig(sampler_seed=7), None, 1, index)
    search_pool.worker_main(base, TINY_SPACE, SearchConfig(), None, 1, 1)
    # On a continued study a worker opens it with the count the main process started from.
    search_pool.worker_main(base, TINY_SPACE, SearchConfig(sampler_seed=7), None, 1, 1, 4)
    assert seen == [(8, 0), (9, 0), (None, 0), (8, 4)]


def test_a_continued_study_gives_each_process_a_seed_of_its_own():
    """Main process and workers, new and continued studies: no two start one sequence."""
    from cnnkit.search.study import sampler_seed

    assert sampler_seed(None, 5) is None
    assert sampler_seed(7, 0) == 7  # A new study: the seed as given, reproducible.
    # Seeds of processes (seed + index) for studies continued from 0 to 19 trials.
    seeds = [sampler_seed(7 + index, held) for held in range(20) for index in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= seed < 2**32 for seed in seeds)
    # A continued run is reproducible too: the seed is a fixed mix of seed and count (numpy's
    # SeedSequence, stable across numpy versions), in which their order matters.
    assert sampler_seed(7, 3) == 3466196061
    assert {sampler_seed(8, 3), sampler_seed(7, 4), sampler_seed(3, 7)}.isdisjoint({3466196061})


def test_importances_are_fanova_over_the_parameters_that_varied():

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_categorical("fixed", [1])
        return trial.suggest_float("strong", 0, 1) * 2 + trial.suggest_int("weak", 0, 3) * 0.01

    study.optimize(objective, n_trials=12)
    importances = parameter_importances(study)
    assert set(importances) == {"strong", "weak"}  # "fixed" never varied.
    assert importances["strong"] > 0.9 and all(type(v) is float for v in importances.values())
    assert parameter_importances(study) == importances  # Seeded: the same every time.


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_running_trial_of_a_dead_process_runs_again(tmp_path, digits_data):
    base = tiny_base(tmp_path / "search", epochs=1)
    study = open_study(SearchConfig(sampler="grid"), TINY_SPACE, base.run_dir())[0]
    trial = study.ask()
    suggest_params(trial, TINY_SPACE, grid=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker", {**worker_identity(), "pid": dead.pid, "start": None})
    lost = dict(trial.params)

    result = run_search(
        base,
        TINY_SPACE,
        SearchConfig(sampler="grid", pruner="none"),
        progress=False,
        data=digits_data,
    )
    study = load_study(base.run_dir())
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.FAIL
    params = finished_params(study)
    assert len(params) == 4 and len(set(params)) == 4
    assert tuple(sorted(lost.items())) in params
    assert result.counts["complete"] == 4
    # The lost trial ran again: a rerun, not a failure of its settings.
    assert result.counts["fail"] == 0 and result.counts["rerun"] == 1


def test_a_tpe_search_at_its_default_budget_says_so():
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.CategoricalDistribution([1, 2])
    for number in range(20):
        trial = optuna.trial.create_trial(
            params={"convs": 1 + number % 2}, distributions={"convs": distribution}, value=0.5
        )
        study.add_trial(trial)
    assert nothing_left_to_run(study, SearchConfig(), TINY_SPACE) == (
        "the search already holds 20 finished trials and 20 is the default budget: nothing "
        "left to run (a larger --n-trials runs more)"
    )


def test_random_search_with_pruning_and_importances(tmp_path, digits_data):
    """Two trials that learn finish; a third whose learning rate leaves it at chance level is
    pruned after its first epoch. The importances share 1 between the two searched settings."""
    # Enough steps that a learning model is clearly above chance after one epoch.
    base = tiny_base(tmp_path / "search", epochs=2, max_steps_per_epoch=15)
    space = SearchSpace(
        "lr",
        (
            SearchParameter("learning_rate", "float", "train.learning_rate", 1e-9, 1e-1, log=True),
            SearchParameter("dense", "categorical", "model.options.dense", choices=(8, 16)),
        ),
    )
    config = SearchConfig(
        sampler="random",
        pruner="median",
        n_trials=3,
        sampler_seed=0,
        prune_warmup=1,
        median_startup_trials=2,
    )
    # The trials run in this order: the two that learn first, so the median has a baseline.
    study = open_study(config, space, base.run_dir())[0]
    for learning_rate, dense in ((3e-3, 16), (1e-2, 8), (1e-9, 16)):
        study.enqueue_trial({"learning_rate": learning_rate, "dense": dense})
    result = run_search(base, space, config, progress=False, data=digits_data)
    assert result.counts["complete"] == 2 and result.counts["pruned"] == 1
    states = {trial.params["learning_rate"]: trial for trial in result.trials}
    assert [states[rate].state for rate in (3e-3, 1e-2, 1e-9)] == ["complete", "complete", "pruned"]
    pruned = states[1e-9]
    assert pruned.epochs == 1 and len(pruned.curve) == 1
    assert states[3e-3].epochs == states[1e-2].epochs == 2
    importances = parameter_importances(load_study(base.run_dir()))
    assert set(importances) == {"learning_rate", "dense"}
    assert all(value >= 0 for value in importances.values())
    assert sum(importances.values()) == pytest.approx(1.0)


def test_retrain_best_saves_a_loadable_model(tmp_path, digits_data):
    base = tiny_base(tmp_path / "search", epochs=1)
    config = SearchConfig(sampler="grid", pruner="none", n_trials=1, retrain_best=True)
    result = run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    assert result.retrained is not None
    path = result.retrained.model_path
    assert path == base.run_dir() / "best" / "model.safetensors"
    model = cnnkit.load_model(path)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.metadata.options["dense"] == result.best.params["dense"]
    retrained_config = (base.run_dir() / "best" / "config.yaml").read_text()
    assert "val_fraction: 0.0" in retrained_config
    # Trained on the training and validation images together.
    assert "train+val" in result.retrained.data_description
    # Retrained again (a larger budget), best/ is replaced but the user's own files in it stay.
    (base.run_dir() / "best" / "notes.txt").write_text("mine", encoding="utf-8")
    more = SearchConfig(sampler="grid", pruner="none", n_trials=2, retrain_best=True)
    again = run_search(base, TINY_SPACE, more, progress=False, data=digits_data)
    assert again.retrained is not None and cnnkit.load_model(again.retrained.model_path)
    assert (base.run_dir() / "best" / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_retrain_best_with_no_finished_trial_says_there_is_nothing(tmp_path, digits_data, caplog):
    """Every trial diverges (a learning rate of 1e30): the failures are counted, and
    --retrain-best says why it trains nothing."""
    base = tiny_base(tmp_path / "search", epochs=1, learning_rate=1e30)
    config = SearchConfig(sampler="grid", pruner="none", n_trials=1, retrain_best=True)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        result = run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    assert result.counts["fail"] == 1 and result.counts["complete"] == 0
    assert result.retrained is None and not (base.run_dir() / "best").exists()
    assert "--retrain-best: no trial finished, so there is nothing to retrain" in caplog.text


# ----------------------------------------------------------------------------- processes


def test_core_share_gives_running_trials_the_idle_cores():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    share = CoreShare(study, cores=4)
    assert share.threads() == 4  # Nothing running yet: the first trial may take them all.
    trials = [study.ask() for _ in range(3)]
    assert share.threads() == 1  # 4 cores // 3 running trials.
    study.tell(trials[0], 0.5)
    assert share.threads() == 2
    study.tell(trials[1], 0.5)
    threads = torch.get_num_threads()
    try:
        share.on_epoch_end(None, {})
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_default_workers_one_per_core_on_cpu_and_one_on_gpu():
    assert default_workers("cuda") == 1
    assert default_workers("cpu") == max(1, min(os.cpu_count() or 1, 4))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_worker_dies_with_its_killed_search_process():
    child = (
        "from cnnkit.search.workers import die_with_parent; die_with_parent(); "
        "import time; print('armed', flush=True); time.sleep(60)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    env = subprocess_env()
    process = subprocess.Popen(
        [sys.executable, "-c", parent], env=env, stdout=subprocess.PIPE, text=True
    )
    worker = int(process.stdout.readline())
    assert process.stdout.readline().strip() == "armed"  # The worker shares the pipe.
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30  # Generous: a loaded machine delivers the signal late.
    while time.monotonic() < deadline and Path(f"/proc/{worker}").exists():
        status = Path(f"/proc/{worker}/status").read_text(errors="replace")
        if "State:\tZ" in status:
            break
        time.sleep(0.1)
    else:
        assert not Path(f"/proc/{worker}").exists(), "the worker outlived its search process"


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, caplog):
    base = tiny_base(tmp_path / "search", epochs=2)
    config = SearchConfig(sampler="grid", pruner="none", workers=2)
    result = run_search(base, TINY_SPACE, config, progress=False)
    params = finished_params(load_study(base.run_dir()))
    assert len(params) == 4 and len(set(params)) == 4
    assert result.counts["complete"] == 4
    assert "exited with status" not in caplog.text  # The extra worker ended cleanly.


def test_an_error_in_the_main_process_stops_the_workers_at_once(tmp_path, monkeypatch, capfd):
    """The error ends the search as soon as it happens: the extra worker is stopped, not left
    to run the rest of the budget while the command waits for it."""
    from cnnkit.search import trials as search_trials

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the main process")

    monkeypatch.setattr(search_trials, "train_run", broken)  # A spawned worker trains as usual.
    base = tiny_base(tmp_path / "search", epochs=3)
    space = SearchSpace("wide", (*TINY_SPACE.parameters[:1], WIDE_DENSE), preset="book-hasy")
    with pytest.raises(RuntimeError, match="a bug in the main process"):
        run_search(base, space, SearchConfig(sampler="grid", pruner="none", workers=2))
    # Stopped while still importing, it ended quietly: no KeyboardInterrupt traceback.
    assert "Traceback" not in capfd.readouterr().err
    # The worker was stopped while it started up or ran its first trials, not after all 12.
    assert len(finished_params(load_study(base.run_dir()))) < 4


def _search_command(out: Path, workers: int = 1, epochs: int = 2, steps: int = 3) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cnnkit",
        "search",
        "--dataset",
        "digits",
        "--model",
        "book_cnn",
        "--space",
        str(out.parent / "space.yaml"),
        "--sampler",
        "grid",
        "--pruner",
        "none",
        "--workers",
        str(workers),
        "--epochs",
        str(epochs),
        "--max-steps-per-epoch",
        str(steps),
        "--quiet",
        "--out",
        str(out),
    ]


def _search_after_one_trial(out: Path, *args: int, **popen) -> subprocess.Popen:
    """Start ``cnnkit search`` (2x2 grid; ``args`` as :func:`_search_command`'s) into ``out``
    and return once a trial has finished."""
    (out.parent / "space.yaml").write_text(
        "convs: {type: categorical, choices: [1, 2]}\n"
        "dense: {type: categorical, choices: [8, 16]}\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(_search_command(out, *args), env=subprocess_env(), **popen)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        results = out / "results.csv"
        if results.exists() and len(results.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    if process.poll() is not None:
        pytest.fail("the search ended before it could be stopped")
    return process


@pytest.mark.slow  # 18 s; the default suite keeps the dead-process and Ctrl-C resume tests.
def test_killed_search_resumes_without_repeats(tmp_path):
    out, env = tmp_path / "search", subprocess_env()
    process = _search_after_one_trial(out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    running = [
        t.number for t in load_study(out).trials if t.state == optuna.trial.TrialState.RUNNING
    ]
    # A trial killed before it recorded its worker counts as orphaned after ORPHAN_SECONDS.
    time.sleep(ORPHAN_SECONDS + 0.5)
    rerun = subprocess.run(_search_command(out), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    study = load_study(out)
    params = finished_params(study)
    assert len(params) == 4 and len(set(params)) == 4
    for number in running:  # The trial cut short was failed and its grid point run again.
        assert study.trials[number].state == optuna.trial.TrialState.FAIL
        # A kill between two suggest calls leaves only some parameters recorded.
        cut_short = set(study.trials[number].params.items())
        assert any(cut_short <= set(finished) for finished in params)
    # The summary counts the killed trial as run again, not as a failure of its settings.
    again = f", {len(running)} interrupted and queued again" if running else ""
    assert f"4 finished, 0 pruned, 0 failed{again} (" in rerun.stdout
    # Without --retrain-best, the summary names the best trial's model file.
    best_model = re.search(r"Best trial's model: (\S+)", rerun.stdout)
    assert best_model and Path(best_model.group(1)).is_file()


def test_a_storage_that_is_not_a_database_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a database\n" * 100, encoding="utf-8")
    config = SearchConfig(sampler="grid", storage=f"sqlite:///{junk}")
    with pytest.raises(ValueError, match=f"storage sqlite:///{junk}: cannot open the study") as e:
        open_study(config, TINY_SPACE, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # No empty search folder left behind.
    (tmp_path / "mine").mkdir()  # A folder that was there before stays.
    with pytest.raises(ValueError, match="cannot open the study"):
        open_study(config, TINY_SPACE, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()


def test_cli_search_refuses_zero_workers(capsys) -> None:
    from cnnkit.cli import main

    assert main(["search", "--dataset", "digits", "--workers", "0", "--epochs", "1"]) == 2
    assert "workers must be >= 1" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_running_trials_of_other_workers_count_against_the_budget(tmp_path) -> None:
    config = SearchConfig(sampler="random", n_trials=2)
    study = open_study(config, TINY_SPACE, tmp_path / "run")[0]
    done = study.ask()
    suggest_params(done, TINY_SPACE, grid=False)
    study.tell(done, 0.5)
    running = study.ask()  # Another worker's trial, still running.
    suggest_params(running, TINY_SPACE, grid=False)
    assert trials_to_run(study, config, TINY_SPACE) == 1
    assert trials_to_run(study, config, TINY_SPACE, count_running=True) == 0


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_worker_starting_while_the_last_trial_runs_elsewhere_runs_none(tmp_path) -> None:
    from cnnkit.search.loop import optimize_study

    class Runner:
        config = SearchConfig(sampler="random", n_trials=2)
        space, run_dir, calls = TINY_SPACE, tmp_path / "run", 0

        def __call__(self, trial):
            Runner.calls += 1
            suggest_params(trial, TINY_SPACE, grid=False)
            return 0.5

    study = open_study(Runner.config, TINY_SPACE, Runner.run_dir)[0]
    done = study.ask()
    suggest_params(done, TINY_SPACE, grid=False)
    study.tell(done, 0.5)
    running = study.ask()  # The budget's last trial, running in another worker.
    suggest_params(running, TINY_SPACE, grid=False)
    optimize_study(study, Runner())
    assert Runner.calls == 0
    assert len(study.get_trials(deepcopy=False)) == 2
    study.tell(running, 0.6)  # With one left and none running elsewhere, it runs one.
    optimize_study(study, Runner())
    assert Runner.calls == 0  # The budget of 2 is already finished.
    Runner.config = SearchConfig(sampler="random", n_trials=3)
    optimize_study(study, Runner())
    assert Runner.calls == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_reporter_passes_on_every_ended_trial_once(tmp_path) -> None:
    config = SearchConfig(sampler="random")
    study = open_study(config, TINY_SPACE, tmp_path / "run")[0]
    seen: list[int] = []
    earlier = study.ask()  # Ended before this run: not repeated.
    suggest_params(earlier, TINY_SPACE, grid=False)
    study.tell(earlier, 0.05)
    reporter = TrialReporter(lambda summary: seen.append(summary.number), tmp_path / "run", study)
    for value in (0.1, 0.2):  # Finished by "another process": nobody reported them yet.
        trial = study.ask()
        suggest_params(trial, TINY_SPACE, grid=False)
        study.tell(trial, value)
    reporter.report_new(study)
    reporter.report_new(study)
    failed = study.ask()  # Failed in another process: reported all the same.
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    reporter.report_new(study)
    reporter.report_new(study)
    assert seen == [1, 2, 3]


class _CtrlCRunner:
    """A trial objective that is interrupted (Ctrl-C) in its first epoch, or that fails with
    ``error`` instead."""

    def __init__(self, run_dir: Path, error: Exception | None = None) -> None:
        self.config = SearchConfig(sampler="random", n_trials=1)
        self.space, self.run_dir, self.error = TINY_SPACE, run_dir, error

    def __call__(self, trial):
        from cnnkit.training.trainer import TrainingInterrupted

        suggest_params(trial, TINY_SPACE, grid=False)
        raise self.error or TrainingInterrupted(0, None)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_ctrl_c_in_a_trial_logs_no_traceback(tmp_path, caplog) -> None:
    from cnnkit.search.loop import optimize_study
    from cnnkit.training.trainer import TrainingInterrupted

    runner = _CtrlCRunner(tmp_path / "run")
    study = open_study(runner.config, TINY_SPACE, runner.run_dir)[0]
    optuna.logging.enable_propagation()  # Optuna's records reach caplog only this way.
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(TrainingInterrupted):
            optimize_study(study, runner)
        # Neither a traceback nor "Trial 0 failed with value None.": it is queued again.
        assert not [r for r in caplog.records if "Trial 0" in r.getMessage() or r.exc_info]
        # A real failure is still logged whole: the filter drops interruptions only.
        with caplog.at_level(logging.WARNING), pytest.raises(ValueError):
            optimize_study(study, _CtrlCRunner(tmp_path / "run", ValueError("broken")))
    finally:
        optuna.logging.disable_propagation()
    failures = [r for r in caplog.records if "Trial 1 failed" in r.getMessage()]
    assert failures and any(r.exc_info for r in failures)
    assert not logging.getLogger("optuna.study._optimize").filters  # Removed afterwards.


def test_an_interrupted_search_leaves_its_tables_and_figures(tmp_path):
    """``kill`` (as Ctrl-C) mid-search: the finished trials' table and figures are written, so
    ``cnnkit report`` shows them, and the command says how to continue."""
    out = tmp_path / "search"
    process = _search_after_one_trial(out, stdout=subprocess.PIPE, text=True)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Rerun the same command to continue the study." in stdout
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "results.md").read_text().startswith("| rank | trial |")


def test_kill_stops_a_search_and_its_workers(tmp_path):
    """``kill`` reaches the main process alone: it stops its workers too, and every trial cut
    short is left to run again, none RUNNING."""
    out = tmp_path / "search"
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    process = _search_after_one_trial(out, 2, 4, 20, **popen)  # Trials of 80 steps.
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    # Left RUNNING only by a kill between Optuna's ask and the trial's start, before it says
    # which process runs it: the next run re-queues such an orphan (see recover_trials).
    running = [t for t in load_study(out).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert all(t.user_attrs.get("worker") is None for t in running)
    assert len(finished_params(load_study(out))) < 4  # Stopped, not run to the end.
    assert "exited with status" not in stderr and "Traceback" not in stderr


def test_trials_print_no_epoch_lines_off_a_terminal(tmp_path, digits_data, capsys):
    """A search's output is one line per trial (the CLI's), not every trial's epochs."""
    base = tiny_base(tmp_path / "search", epochs=2)
    config = SearchConfig(sampler="grid", pruner="none", n_trials=1)
    run_search(base, TINY_SPACE, config, progress=True, data=digits_data)
    assert not re.findall(r"^epoch \d/2:", capsys.readouterr().err, re.M)


def test_interrupts_wait_for_the_storage_and_go_off_at_the_next_safe_point():
    from cnnkit.search.workers import Interrupts

    guard = Interrupts()
    with pytest.raises(KeyboardInterrupt), guard.installed(), guard.interruptible():
        with guard.storage():
            os.kill(os.getpid(), signal.SIGTERM)  # Mid-query: held over...
            time.sleep(0.05)
            reached_the_end_of_the_query = True
        pytest.fail("the interrupt should go off when the query ends")
    assert reached_the_end_of_the_query
    # Outside any interruptible block the signal waits for the next one, or the block's end.
    with pytest.raises(KeyboardInterrupt), guard.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        held_until_the_end = True
    assert held_until_the_end
    assert signal.getsignal(signal.SIGTERM) is not guard._handle  # Handlers restored.


def test_an_interrupt_python_ignored_still_stops_the_block():
    """A signal that lands in a garbage-collection callback raises there, where Python prints
    "Exception ignored" and goes on; the guard still stops at the interruptible block's end,
    and keeps Python from printing the ignored interrupt's traceback."""
    import gc
    import weakref

    from cnnkit.search.workers import Interrupts

    class Node:
        pass

    def on_collected(_reference) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # Delivered inside the callback: ignored there.

    guard = Interrupts()
    printed = []  # What Python's hook would print as "Exception ignored in ...".
    outer_hook, sys.unraisablehook = sys.unraisablehook, printed.append
    try:
        with pytest.raises(KeyboardInterrupt), guard.installed(), guard.interruptible():
            node = Node()
            reference = weakref.ref(node, on_collected)
            del node
            gc.collect()
            assert reference() is None
            went_on_after_the_ignored_interrupt = True
    finally:
        sys.unraisablehook = outer_hook
    assert went_on_after_the_ignored_interrupt
    assert printed == []  # Held quietly: the user sees no traceback.
    assert not guard.pending
    with guard.installed(), guard.interruptible():  # Nothing is left over for the next block.
        pass
    # Left by another error instead, the block keeps the ignored interrupt for the next one.
    with guard.installed(), pytest.raises(KeyboardInterrupt):
        with pytest.raises(ValueError), guard.interruptible():
            node = Node()
            reference = weakref.ref(node, on_collected)
            del node
            gc.collect()
            raise ValueError("a trial's own error")
        assert guard.pending
        with guard.interruptible():
            pytest.fail("the held interrupt should go off as the next block starts")


def test_a_trial_that_trained_to_its_end_keeps_its_result_when_a_signal_was_swallowed(
    tmp_path, digits_data, monkeypatch
):
    """A signal that lands where Python ignores it, in a trial's last steps, stops the search
    before the next trial: the finished trial is recorded, not re-queued and run again."""
    from cnnkit.search import trials as search_trials
    from cnnkit.search.workers import INTERRUPTS
    from cnnkit.training.trainer import TrainingInterrupted

    def train_then_swallowed_signal(*args, **kwargs):
        result = train_run(*args, **kwargs)
        INTERRUPTS.pending = True  # What the handler leaves when its raise was ignored.
        return result

    monkeypatch.setattr(search_trials, "train_run", train_then_swallowed_signal)
    base = tiny_base(tmp_path / "search")
    config = SearchConfig(sampler="grid", pruner="none", n_trials=2)
    with pytest.raises((KeyboardInterrupt, TrainingInterrupted)):
        run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    study = load_study(base.run_dir())
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in complete] == [0] and complete[0].value is not None
    # The rerun runs one more trial, at another grid point, instead of repeating trial 0.
    monkeypatch.undo()
    rerun = run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    assert rerun.counts["complete"] == 2
    assert len(set(finished_params(load_study(base.run_dir())))) == 2


def test_the_table_ranks_finished_trials_on_their_objective_as_optuna_does(tmp_path):
    """A transfer trial's epochs (the fine-tune's) may peak below what its objective returned:
    the table's best is Optuna's best trial, the one --retrain-best trains."""
    from cnnkit.search.driver import SearchResult
    from cnnkit.search.results import summarize_trial

    study = optuna.create_study(direction="maximize")
    for value, epochs_best in ((0.9, 0.5), (0.8, 0.85)):
        attrs = {"result": {"val_accuracy": epochs_best, "epochs_run": 2}}
        study.add_trial(
            optuna.trial.create_trial(
                params={"convs": 1},
                distributions={"convs": optuna.distributions.CategoricalDistribution([1, 2])},
                value=value,
                user_attrs=attrs,
            )
        )
    trials = [summarize_trial(trial, tmp_path) for trial in study.trials]
    assert [trial.val_accuracy for trial in trials] == [0.9, 0.8]
    result = SearchResult(tmp_path, "", "", trials, {}, {}, None, 0.0)
    assert result.best.number == study.best_trial.number == 0


def test_an_ensemble_is_refused_by_search(tmp_path, digits_data):
    space = parse_space(
        {"members": {"type": "categorical", "choices": [1, 2], "target": "model.options.members"}},
        "ensembles",
    )
    base = tiny_base(tmp_path / "search")
    with pytest.raises(ValueError, match="search trains one model a trial, not ensembles"):
        run_search(base, space, SearchConfig(sampler="grid"), progress=False, data=digits_data)
    assert not (tmp_path / "search").exists()


# ----------------------------------------------------------------------------- reviewed defects


@pytest.mark.parametrize(
    ("choices", "written"),
    [
        ((0, 0.5), [0.0, 0.5]),
        ((None, 3), ["None", "3"]),
        (("adam", 1), ["adam", "1"]),
        # torch's hparams() takes a bool for an int: TensorBoard shows 1 and 0.
        ((True, False), [1.0, 0.0]),
    ],
)
def test_hparams_take_choices_of_mixed_types(tmp_path, choices, written):
    """TensorBoard takes a discrete domain of one type: [0, 0.5] and [null, 3] once raised."""
    from cnnkit.evaluation.search_table import TrialSummary
    from cnnkit.search.results import log_trial_hparams

    space = SearchSpace(
        "mixed", (SearchParameter("x", "categorical", "train.seed", choices=choices),)
    )
    for number, choice in enumerate(choices):
        trial = TrialSummary(number, "complete", {"x": choice}, 0.25 * (number + 1), 1.5, None, 2)
        log_trial_hparams(tmp_path, trial, space)
    for number, expected in enumerate(written):
        values, domains, scalars = read_events(tmp_path / f"trial-{number:03d}")
        assert values == {"x": expected, "state": "complete"}
        assert type(values["x"]) is type(expected)  # "3" as text, not the number 3.
        assert domains == {"x": written, "state": ["complete", "pruned"]}
        assert [type(choice) for choice in domains["x"]] == [type(w) for w in written]
        # No test accuracy: no scalar for it.
        assert scalars == {
            "hparams/val_accuracy": [(0, 0.25 * (number + 1))],
            "hparams/val_loss": [(0, 1.5)],
            "hparams/epochs_run": [(0, 2.0)],
        }


def test_a_failing_hparams_log_neither_stops_the_search_nor_its_tables(
    tmp_path, digits_data, monkeypatch, caplog
):
    from cnnkit.search import loop as search_loop

    def fail(*args):
        raise TypeError("hparam_domain_discrete[x] should be a list of same type")

    monkeypatch.setattr(search_loop, "log_trial_hparams", fail)
    base = tiny_base(tmp_path / "search", epochs=1)
    config = SearchConfig(sampler="grid", pruner="none", n_trials=2)
    result = run_search(base, TINY_SPACE, config, progress=False, data=digits_data)
    assert result.counts["complete"] == 2
    assert (tmp_path / "search" / "results.csv").is_file()
    assert "trial-000: not logged to TensorBoard HParams (hparam_domain_discrete" in caplog.text


def test_an_option_one_of_the_searched_models_lacks_is_refused(tmp_path, digits_data):
    """A symbol_cnn trial would fail on dense and end the search: refused before it starts."""
    space = parse_space(
        {
            "model": {"choices": ["book_cnn", "symbol_cnn"], "target": "model.name"},
            "dense": {"choices": [16, 32], "target": "model.options.dense"},
        },
        "two",
    )
    base = tiny_base(tmp_path / "search")
    with pytest.raises(ValueError) as error:
        run_search(base, space, SearchConfig(sampler="grid"), progress=False, data=digits_data)
    assert str(error.value) == (
        "search space 'two': search parameter 'dense' sets model option 'dense', which "
        "symbol_cnn (a choice of model.name) does not take; search each model in a space of "
        "its own"
    )
    assert not (tmp_path / "search").exists()


def test_a_parameter_named_epochs_keeps_its_own_column(tmp_path):
    """The epochs a trial ran are ``epochs_run``: a searched ``epochs`` is not overwritten."""
    from cnnkit.evaluation.html_report import build_report_html
    from cnnkit.evaluation.search_table import TrialSummary, write_results_tables

    trial = TrialSummary(0, "complete", {"epochs": 7}, 0.5, 1.0, None, 3)
    write_results_tables([trial], ["epochs"], tmp_path)
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    assert row["epochs"] == "7" and row["epochs_run"] == "3"
    (tmp_path / "search.yaml").write_text("space: {parameters: {epochs: {}}}\n", encoding="utf-8")
    assert "Best: trial 0 (epochs=7)" in build_report_html(tmp_path)


@pytest.mark.parametrize("name", ["seconds", "state", "val_accuracy", "pruned", "epochs_run"])
def test_a_parameter_named_as_a_result_column_is_refused(tmp_path, digits_data, name):
    space = parse_space({name: {"choices": [1, 2], "target": "train.seed"}}, "clash")
    base = tiny_base(tmp_path / "search")
    message = f"parameter {name!r} has the name of a column of the results table; rename it"
    with pytest.raises(ValueError, match=message):
        run_search(base, space, SearchConfig(sampler="grid"), progress=False, data=digits_data)
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--dense", "64"], "--dense 64: the space 'book' searches model.options.dense; "),
        (["--option", "dropout=0.1"], "--option dropout=0.1: the space 'book' searches "),
        (["--config", "CONFIG"], "settings.yaml: model.options.convs is set there to 1, and "),
    ],
)
def test_cli_search_refuses_a_setting_the_space_searches(tmp_path, capsys, given, message):
    """An option a user gives is never second-guessed: every trial would override it."""
    from cnnkit.cli import main

    config_file = tmp_path / "settings.yaml"
    config_file.write_text("model: {options: {convs: 1}}\n", encoding="utf-8")
    given = [str(config_file) if word == "CONFIG" else word for word in given]
    out = tmp_path / "search"
    argv = ["search", "--dataset", "digits", "--space", "book", "--out", str(out), *given]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_search_takes_back_the_settings_its_print_config_wrote(tmp_path, capsys):
    """The README's round trip (print, edit, pass back with --config): the printed file holds
    the searched options at the preset's values, which change nothing."""
    from cnnkit.cli import main

    argv = ["search", "--dataset", "digits", "--space", "book", "--epochs", "1"]
    assert main([*argv, "--print-config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out, encoding="utf-8")
    assert "convs: 2" in printed.read_text()
    assert main([*argv, "--config", str(printed), "--print-config"]) == 0
    assert capsys.readouterr().out == printed.read_text(encoding="utf-8")
    # An edited file: its settings are the search's, the rest as before.
    edited = printed.read_text(encoding="utf-8")
    for line, change in (("learning_rate: 0.002", "0.0005"), ("batch_size: 128", "64")):
        assert edited.count(f"  {line}\n") == 1
        edited = edited.replace(f"  {line}\n", f"  {line.split(':')[0]}: {change}\n")
    printed.write_text(edited, encoding="utf-8")
    assert main([*argv, "--config", str(printed), "--print-config"]) == 0
    assert capsys.readouterr().out == edited


def test_continuing_a_search_with_other_pruner_settings_is_refused(tmp_path):
    from cnnkit.search.settings import check_same_search, write_search_settings

    base = tiny_base(tmp_path / "search")
    config = SearchConfig(pruner="halving", prune_warmup=2)
    run_dir = base.run_dir()
    run_dir.mkdir()
    write_search_settings(run_dir, base, TINY_SPACE, config, "search", "sqlite:///x")
    assert check_same_search(run_dir, base, TINY_SPACE, config) == "search"
    for changed in (replace(config, prune_warmup=3), replace(config, reduction_factor=4)):
        with pytest.raises(ValueError, match=r"holds a search with another pruner setting \("):
            check_same_search(run_dir, base, TINY_SPACE, changed)
    # Settings the pruner does not read may change.
    assert check_same_search(run_dir, base, TINY_SPACE, replace(config, median_startup_trials=9))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"val_fraction": 0.0}, "--val-fraction (data.val_fraction) must be above 0"),
        ({"train_on_all": True}, "remove data.train_on_all from the --config file"),
    ],
)
def test_a_search_without_held_out_images_is_refused(tmp_path, digits_data, data, message):
    base = tiny_base(tmp_path / "search")
    base = replace(base, data=replace(base.data, **data))
    with pytest.raises(ValueError, match=re.escape(message)):
        run_search(base, TINY_SPACE, SearchConfig(), progress=False, data=digits_data)
    assert not (tmp_path / "search").exists()


def test_an_out_that_is_a_file_is_named(tmp_path, digits_data):
    afile = tmp_path / "afile"
    afile.write_text("", encoding="utf-8")
    for out, message in (
        (afile, f"--out {afile} names a file, not a folder"),
        (afile / "sub", f"--out {afile / 'sub'}: {afile} is a file, not a folder"),
    ):
        with pytest.raises(ValueError) as error:
            run_search(tiny_base(out), TINY_SPACE, SearchConfig(), data=digits_data)
        assert str(error.value) == message


def test_a_search_inside_its_folder_dataset_is_refused(tmp_path, digits_data):
    """Its trials' report images would become training images, as for a run (test_cli)."""
    data = tmp_path / "shapes"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
    for out in (data, data / "runs" / "search"):
        base = tiny_base(out)
        base = replace(base, data=replace(base.data, dataset="folder", data=str(data)))
        with pytest.raises(ValueError, match=f"--out {re.escape(str(out))} is inside the"):
            run_search(base, TINY_SPACE, SearchConfig(), progress=False, data=digits_data)
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]  # Nothing written there.


def test_a_trial_that_repeats_a_finished_one_is_not_trained_again(tmp_path, digits_data):
    from cnnkit.search.results import summarize_trial
    from cnnkit.search.trials import TrialRunner

    base = tiny_base(tmp_path / "search")
    config = SearchConfig(sampler="tpe", pruner="none")
    study = optuna.create_study(direction="maximize")
    distributions = {
        p.name: optuna.distributions.CategoricalDistribution(p.choices)
        for p in TINY_SPACE.parameters
    }
    params = {"convs": 1, "dense": 8}
    result = {"val_accuracy": 0.25, "epochs_run": 2}
    study.add_trial(
        optuna.trial.create_trial(
            params=params, distributions=distributions, value=0.25, user_attrs={"result": result}
        )
    )
    study.enqueue_trial(params)
    runner = TrialRunner(base, TINY_SPACE, config, base.run_dir(), None, False, digits_data)
    study.optimize(runner, n_trials=1)
    repeat = study.trials[1]
    assert repeat.value == 0.25 and repeat.user_attrs["repeats"] == 0
    assert not (base.run_dir() / "trials").exists()  # Nothing was trained.
    summary = summarize_trial(repeat, base.run_dir())
    assert summary.repeats == 0 and summary.epochs == 2
    assert summary.to_row(["convs", "dense"])["repeats"] == 0
