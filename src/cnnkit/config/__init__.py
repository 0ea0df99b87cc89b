"""Frozen configuration dataclasses, building them from layered overrides, and YAML load/dump.

Precedence when resolving a run: dataclass defaults < named preset (:mod:`cnnkit.presets`) <
``--config`` file < flags.
"""

from cnnkit.config.checks import MAX_IMAGE_SIDE, MAX_SEED
from cnnkit.config.files import config_to_dict, dump_config, load_config_file, yaml_error_text
from cnnkit.config.overrides import FLAG_FIELDS, build_run_config, did_you_mean, merge_overrides
from cnnkit.config.preprocessing import Preprocessing
from cnnkit.config.sections import (
    BAD_IMAGE_POLICIES,
    DATASETS,
    SECTIONS,
    AugmentConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    TransferConfig,
)
from cnnkit.config.values import is_number, number_from_text

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DATASETS",
    "FLAG_FIELDS",
    "MAX_IMAGE_SIDE",
    "MAX_SEED",
    "SECTIONS",
    "AugmentConfig",
    "DataConfig",
    "ModelConfig",
    "Preprocessing",
    "RunConfig",
    "TrainConfig",
    "TransferConfig",
    "build_run_config",
    "config_to_dict",
    "did_you_mean",
    "dump_config",
    "is_number",
    "load_config_file",
    "merge_overrides",
    "number_from_text",
    "yaml_error_text",
]
