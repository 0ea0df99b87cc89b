"""A trial's run config: the base config with the trial's parameter values at their targets."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from cnnkit.config import RunConfig, build_run_config, config_to_dict
from cnnkit.search.space import SearchSpace

logger = logging.getLogger(__name__)


def overrides_for(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """Nested config overrides (for :func:`cnnkit.config.build_run_config`) from trial params."""
    overrides: dict[str, Any] = {}
    for parameter in space.parameters:
        if parameter.name not in params:
            continue
        node = overrides
        *parents, leaf = parameter.target.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = params[parameter.name]
    return overrides


def build_trial_config(
    base: RunConfig, space: SearchSpace, params: dict[str, Any], out: Path
) -> RunConfig:
    """The base config with one trial's parameters applied and its own run folder.

    A trial that draws another model (a space that searches ``model.name``) keeps only the
    base's model options that model takes: the base's were set for its own model (a preset's
    ``dense`` for book_cnn means nothing to symbol_cnn), and a model sized by its input gets
    ``image_size`` from the data settings, as the training command gives it.
    """
    config = build_run_config(config_to_dict(base), overrides_for(space, params), {"out": str(out)})
    if config.model.name == base.model.name:
        return config
    from cnnkit.models.registry import model_options

    takes = model_options(config.model.name)
    options = {key: value for key, value in config.model.options.items() if key in takes}
    if "image_size" in takes:
        options["image_size"] = config.data.image_size
    dropped = sorted(set(config.model.options) - set(options))
    if dropped:
        logger.info("%s takes no %s: left out of its trial", config.model.name, ", ".join(dropped))
    return replace(config, model=replace(config.model, options=options))
