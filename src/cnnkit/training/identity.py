"""What a run trains on (its classes, data, limits and a digest of its splits), saved in its
checkpoints so that ``--resume`` refuses a checkpoint of another run.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cnnkit.config import RunConfig
from cnnkit.data.dataset import DataSplits
from cnnkit.evaluation.report import resolved
from cnnkit.training.checkpoint import COPIES_KEY, SPLIT_KEY, SPLIT_SETTINGS_KEY


def run_identity(config: RunConfig, splits: DataSplits) -> dict[str, Any]:
    """What a run trains on, saved in its checkpoints: its class names, the data and the
    limits that choose its images, and a digest of which images its splits hold. ``--resume``
    refuses a checkpoint whose run differs in any of them (its training images could otherwise
    land in the new test split); settings that leave the split as it was (a test share where a
    split column decides) do not count."""
    data = config.data
    return {
        "class_names": list(splits.class_names),
        "dataset": data.dataset,
        "data": resolved(data.data),
        "fold": data.fold,
        "max_classes": data.max_classes,
        "max_per_class": data.max_per_class,
        "train_on_all": data.train_on_all,
        SPLIT_KEY: split_digest(splits),
        COPIES_KEY: splits.copies_kept_together,
        SPLIT_SETTINGS_KEY: {
            "seed": data.seed,
            "test_fraction": data.test_fraction,
            "val_fraction": data.val_fraction,
        },
    }


def split_digest(splits: DataSplits) -> str:
    """A SHA-256 of the image names in each split: the same only for the same split."""
    digest = hashlib.sha256()
    for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        digest.update(f"{name}:{len(part) if part is not None else 0}\n".encode())
        for path in sorted(part.paths) if part is not None else ():
            digest.update(path.encode(errors="replace") + b"\n")
    return digest.hexdigest()[:16]
