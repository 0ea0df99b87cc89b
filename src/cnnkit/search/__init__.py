"""Hyperparameter search with Optuna (``cnnkit search``): search spaces, trial configs for the
one training function, pruning, worker processes and resumable studies; ``driver.run_search``
runs one from its checks to its results."""
