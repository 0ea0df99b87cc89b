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
    """Rebuild a saved model (see :func:`cnnkit.inference.artifact.load_model`)."""
    from cnnkit.inference.artifact import load_model as _load_model

    return _load_model(path, device)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")


__all__ = ["__version__", "load_model", *_LAZY]
