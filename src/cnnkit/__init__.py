"""cnnkit: train, evaluate and serve convolutional image classifiers."""

__version__ = "0.1.0"

# Names of the public API imported on first use: `import cnnkit` stays cheap for the CLI.
_LAZY = {
    "Predictor": "cnnkit.inference.predictor",
    "Prediction": "cnnkit.inference.predictor",
    "open_predictor": "cnnkit.inference.predictor",
    "create_model": "cnnkit.models.registry",
    "ModelFileError": "cnnkit.inference.model_metadata",
    "BadImageError": "cnnkit.data.image",
}


def load_model(path, device="cpu"):
    """Rebuild a model from its file or a training run's folder; never unpickles anything.

    The returned module is in eval mode on ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"mps"``) and carries its metadata (architecture, options, class names,
    preprocessing, training record) as ``model.metadata``. To classify images, use
    :class:`cnnkit.Predictor` (``Predictor.from_file(path).predict(images)``).

    Raises:
        ModelFileError: if the file is missing, truncated, tampered with, or inconsistent, or
            is an ``.onnx`` file (run one with :func:`cnnkit.open_predictor`).
        TypeError: unless ``path`` is a str or a path object.
        ValueError: for an empty path, or an unknown or unavailable ``device``.
    """
    from cnnkit.inference.artifact import load_model as _load_model

    return _load_model(path, device)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")


def __dir__():
    # The lazily imported names too, for help() and tab completion.
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", "load_model", *_LAZY]
