"""The data sources by dataset name: :func:`create_source` builds the one a DataConfig names,
importing only that source's module."""

from __future__ import annotations

from collections.abc import Callable

from cnnkit.config import DataConfig
from cnnkit.data.source import Source


def create_source(config: DataConfig) -> Source:
    """Build the source named by ``config.dataset``."""
    factories: dict[str, Callable[[], Source]] = {
        "digits": lambda: _digits(),
        "hasy": lambda: _hasy(config),
        "folder": lambda: _folder(config),
        "csv": lambda: _csv(config),
        "cub": lambda: _cub(config),
    }
    return factories[config.dataset]()


def _digits() -> Source:
    from cnnkit.data.digits import DigitsSource

    return DigitsSource()


def _hasy(config: DataConfig) -> Source:
    from cnnkit.data.hasy import HasySource

    return HasySource(config.data, fold=config.fold)


def _folder(config: DataConfig) -> Source:
    from cnnkit.data.folder import FolderSource

    return FolderSource(config.data)


def _csv(config: DataConfig) -> Source:
    from cnnkit.data.csv_source import CsvSource

    return CsvSource(config.data)


def _cub(config: DataConfig) -> Source:
    from cnnkit.data.cub import CubSource

    return CubSource(config.data, crop_to_bbox=config.crop_to_bbox)
