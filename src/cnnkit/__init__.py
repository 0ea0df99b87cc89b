"""cnnkit: train, evaluate and serve convolutional image classifiers."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Rebuild a saved model (see :func:`cnnkit.inference.artifact.load_model`)."""
    from cnnkit.inference.artifact import load_model as _load_model

    return _load_model(path, device)


def __getattr__(name):
    # Lazy imports keep `import cnnkit` cheap for the CLI.
    if name == "Predictor":
        from cnnkit.inference.predictor import Predictor

        return Predictor
    if name == "open_predictor":
        from cnnkit.inference.predictor import open_predictor

        return open_predictor
    if name == "create_model":
        from cnnkit.models.registry import create_model

        return create_model
    raise AttributeError(name)


__all__ = ["Predictor", "__version__", "create_model", "load_model", "open_predictor"]
