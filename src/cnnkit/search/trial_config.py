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
    ``dense`` for book_cnn means nothing to symbol_cnn). A model sized by its input gets
    ``image_size`` from the data settings, as the training command gives it; a pretrained
    backbone takes photos at its weights' own size unless the space draws one, and the data
    settings follow it.
    """
    overrides = overrides_for(space, params)
    config = build_run_config(config_to_dict(base), overrides, {"out": str(out)})
    if config.model.name == base.model.name:
        return config
    from cnnkit.models.registry import is_transfer_model, model_input, model_options

    name = config.model.name
    takes = model_options(name)
    options = {key: value for key, value in config.model.options.items() if key in takes}
    if is_transfer_model(name):
        if "image_size" not in (overrides.get("model") or {}).get("options", {}):
            options.pop("image_size", None)  # The base model's size, not this backbone's.
        taken = model_input(name, config.data.channels, options)
        data = replace(config.data, image_size=taken.image_size, stored_size=taken.stored_size)
        config = replace(config, data=data)
    elif "image_size" in takes:
        options["image_size"] = config.data.image_size
    dropped = sorted(set(config.model.options) - set(options))
    if dropped:
        logger.info("%s takes no %s: left out of its trial", config.model.name, ", ".join(dropped))
    return replace(config, model=replace(config.model, options=options))
