"""Models by name: ``@register_model`` adds a factory, ``create_model`` builds from it.

Every registered model is an ``nn.Module`` with ``forward_features(x)`` and ``forward_head(f)``,
``reset_classifier(num_classes)``, and a ``default_preprocessing`` (a :class:`Preprocessing`).
A transfer ensemble (``members`` > 1) has no ``forward_head``: each member has its own
features, and the ensemble averages the members' outputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnnkit.config import Preprocessing, is_number

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
# The names of the pretrained models, which train in phases (frozen head, then fine-tune).
_TRANSFER: set[str] = set()


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``factory`` under its function name; a duplicate name is an error."""
    name = factory.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory


def register_transfer_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a pretrained model (see :func:`is_transfer_model`) as :func:`register_model`
    does."""
    register_model(factory)
    _TRANSFER.add(factory.__name__)
    return factory


def is_transfer_model(name: str) -> bool:
    """Whether model ``name`` is a pretrained one, which trains in phases (a frozen head,
    then a fine-tune), with its checkpoints in the phases' folders.

    Raises:
        ValueError: for an unknown model.
    """
    _load_builtin_models()
    _get_factory(name)
    return name in _TRANSFER


def _load_builtin_models() -> None:
    # Importing these modules runs their @register_model decorators.
    from cnnkit.models import book, cnn, transfer  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_builtin_models()
    return sorted(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The keyword options a model accepts, with their defaults."""
    _load_builtin_models()
    factory = _get_factory(name)
    signature = inspect.signature(factory)
    return {
        key: parameter.default
        for key, parameter in signature.parameters.items()
        if key not in ("num_classes", "in_channels", "pretrained")
        and parameter.default is not inspect._empty
    }


def unknown_options(name: str, options: dict[str, Any]) -> list[str]:
    """The keys of ``options`` that model ``name`` has no option for, sorted."""
    return sorted(set(options) - set(model_options(name)))


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Refuse options model ``name`` does not have, and values of the wrong kind for those
    whose default is a switch or a number (the models check their own ranges): an option whose
    default is a whole number takes only whole numbers (``2.0`` becomes ``2``, ``1.5`` is
    refused), and one whose default is a fraction takes any finite number.

    Returns:
        ``options`` with whole numbers written as fractions (``2.0``) made ints.

    Raises:
        ValueError: for an unknown model, an unknown option, or a value of the wrong kind.
    """
    accepted = model_options(name)
    unknown = unknown_options(name, options)
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
        )
    return {key: _checked_option(key, value, accepted[key]) for key, value in options.items()}


def _checked_option(key: str, value: Any, default: Any) -> Any:
    """``value`` as option ``key`` takes it (judged by its ``default``), else a ValueError."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"model option {key} must be true or false; got {value!r}")
    elif isinstance(default, int):
        whole = is_number(value) and (isinstance(value, int) or value.is_integer())
        if not whole:
            raise ValueError(f"model option {key} must be a whole number; got {value!r}")
        return int(value)
    elif is_number(default) and not (is_number(value) and math.isfinite(value)):
        raise ValueError(f"model option {key} must be a finite number; got {value!r}")
    return value


def model_summary(name: str) -> str:
    """The first paragraph of the model's docstring, on one line: what it is."""
    _load_builtin_models()
    doc = inspect.getdoc(_get_factory(name)) or ""
    paragraph = doc.split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "")


def check_dropout(model: str, dropout: object) -> float:
    """``dropout`` as a float, once checked to be in [0, 1): 1 would drop every unit, and the
    model would learn nothing without a word.

    Raises:
        ValueError: naming ``model`` and the value.
    """
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"{model} dropout must be in [0, 1); got {dropout!r}")
    return float(dropout)


def _get_factory(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int,
    in_channels: int | None = None,
    pretrained: bool = False,
    **options: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name, such as ``book_cnn`` or ``symbol_cnn``.
        num_classes: size of the classifier output.
        in_channels: 1 or 3 input channels (default: the model's own, such as 3 for the
            book's CNN and the ImageNet backbones).
        pretrained: load the packaged ImageNet weights, for backbones that have them.
        **options: model-specific options (see :func:`model_options`).

    Raises:
        ValueError: for an unknown name or option.
    """
    _load_builtin_models()
    factory = _get_factory(name)
    kwargs = check_options(name, options)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    if "pretrained" in inspect.signature(factory).parameters:
        kwargs["pretrained"] = pretrained
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    model = factory(num_classes=num_classes, **kwargs)
    model.registry_name = name
    return model


def create_model_outline(
    name: str, num_classes: int, in_channels: int | None = None, **options: Any
) -> nn.Module:
    """:func:`create_model` on the meta device: the layers, tensor shapes and
    ``default_preprocessing`` of the model, with no memory for its weights (which any option,
    however large, would otherwise claim first).

    Raises:
        ValueError: as :func:`create_model`.
    """
    with torch.device("meta"):
        return create_model(name, num_classes, in_channels, **options)


def model_input(name: str, in_channels: int, options: dict[str, Any]) -> Preprocessing:
    """The input model ``name`` takes with these options (its ``default_preprocessing``).

    Raises:
        ValueError: as :func:`create_model`.
    """
    return create_model_outline(name, 2, in_channels, **options).default_preprocessing
